"""FP8 for the frozen base (launcher/fp8.py decides, launcher/fp8_linear.py computes). The GPU runs are in
tests/test_gpu.py; here the rules, the memory plan's count, and the FP8 arithmetic itself, which torch's
_scaled_mm also runs on the CPU: the same quantization and the same GEMM call as on the GPU.
"""
import dataclasses

import pytest
import torch
import yaml

from conftest import GPU_NODE, compose_cfg, lora_model_with_b
from launcher import fp8, fp8_linear, memory
from launcher.errors import ConfigError
from launcher.plan import build_plan

A100 = dataclasses.replace(GPU_NODE, gpu_name="NVIDIA A100-SXM4-80GB", gpu_mem_gib=79.3, fp8=False)


def planned(*overrides, machine=GPU_NODE):
    plan = build_plan(compose_cfg("gpus=2", *overrides), machine, cwd="/work/project")
    return yaml.safe_load(plan.files["config.yaml"])["plan"], plan.decisions


def fp8_lines(decisions):
    return [d for d in decisions if d.startswith("train.fp8")]


def test_auto_runs_dpo_input_gradients_in_fp8_where_layers_are_wide_and_weights_whole():
    for strategy in ("ddp", "zero2", "auto"):  # strategy=auto chooses ddp for 8B on an H200
        plan, decisions = planned("model=llama-3.1-8b-instruct", f"strategy={strategy}")
        assert plan["fp8"] and not plan["fp8_forward"] and plan["fp8_cache_weights"]
        assert fp8_lines(decisions)[0].startswith("train.fp8=auto -> backward: at Llama-3.1-8B's shape")
        assert "0.63 and 0.66 in two seeds" in fp8_lines(decisions)[0]


@pytest.mark.parametrize("overrides,why", [
    (("model=qwen2.5-1.5b-instruct",), "off: no linear layer of this model is 4096 features wide"),
    (("model=llama-3.1-8b-instruct", "method=kto"), "off: FP8 not measured for method=kto"),
    (("model=llama-3.1-8b-instruct", "method=sft", "data=demo_sft"), "off: at Llama-3.1-8B's shape an FP8 forward ran SFT"),
    (("model=llama-3.1-8b-instruct", "strategy=zero3"), "off: FP8 not measured for speed under strategy=zero3"),
    # 70B in bf16 on two H200s: strategy=auto shards it with or without FP8's copies
    (("model=llama-3.1-70b-instruct",), "off: under fsdp_qlora FP8 is not measured for speed"),
])
def test_auto_leaves_fp8_off_where_it_is_not_measured_to_pay(overrides, why):
    plan, decisions = planned(*overrides)
    assert not plan["fp8"]
    assert fp8_lines(decisions)[0].startswith(f"train.fp8=auto -> {why}"), fp8_lines(decisions)


@pytest.mark.parametrize("overrides,why", [
    # 24 GiB GPUs: FP8's copies (6 GiB at 8B) would push strategy=auto from ddp to a sharded strategy
    (("gpu_mem_gib=24",), "its FP8 weight copies would move strategy=auto from ddp to fsdp_qlora"),
    (("gpu_mem_gib=24", "strategy=ddp"), "with its FP8 weight copies the job would not fit"),  # micro_batch=auto
    (("gpu_mem_gib=20", "strategy=ddp", "micro_batch=2", "train.gradient_checkpointing=true"),
     "with its FP8 weight copies the job would not fit"),  # nothing to size: the plan itself would not fit
    (("gpu_mem_gib=70",), "its FP8 weight copies would turn gradient checkpointing on"),
])
def test_auto_drops_fp8_where_its_weight_copies_would_change_the_sizing(overrides, why):
    job = ("model=llama-3.1-8b-instruct", *overrides)
    plan, decisions = planned(*job)
    assert not plan["fp8"] and len(fp8_lines(decisions)) == 1  # the reason it is off, not first on then off
    assert fp8_lines(decisions)[0].startswith(f"train.fp8=auto -> off: {why}")
    off_plan, off_decisions = planned(*job, "train.fp8=false")  # sized as without FP8, decision for decision
    assert {k: plan[k] for k in ("strategy", "gradient_checkpointing", "token_budget")} == \
           {k: off_plan[k] for k in ("strategy", "gradient_checkpointing", "token_budget")}
    assert [d for d in decisions if not d.startswith("train.fp8")] == \
           [d for d in off_decisions if not d.startswith("train.fp8")]


def test_python_m_launcher_plan_counts_the_fp8_copies_a_launch_would_have():
    from launcher.__main__ import memory_plan_text

    text = memory_plan_text(compose_cfg("gpus=1", "model=llama-3.1-8b-instruct", "gpu_mem_gib=139.8"), GPU_NODE)
    assert "train.fp8: backward" in text and "108.4 GiB of 140 GiB per GPU at micro_batch=32" in text
    small = memory_plan_text(compose_cfg("gpus=1", "model=llama-3.1-8b-instruct", "gpu_mem_gib=24"), GPU_NODE)
    assert "train.fp8: false" in small and "strategy=auto would take ddp" in small


def test_true_turns_fp8_on_with_weights_quantized_once_where_they_are_whole():
    for strategy in ("ddp", "zero2"):
        plan, decisions = planned("model=llama-3.1-8b-instruct", f"strategy={strategy}", "train.fp8=true")
        assert plan["fp8"] and plan["fp8_cache_weights"] and plan["fp8_min_features"] == 4096
        assert "weights quantized once" in fp8_lines(decisions)[0]
    for strategy in ("zero3", "fsdp_qlora"):  # gathered weights: quantized at each use
        plan, decisions = planned("model=llama-3.1-8b-instruct", f"strategy={strategy}", "train.fp8=true")
        assert plan["fp8"] and not plan["fp8_cache_weights"]
        assert "quantized at each gather" in fp8_lines(decisions)[0]
    plan, decisions = planned("model=qwen2.5-1.5b-instruct", "train.fp8=true")
    assert "no linear layer of this model is 4096 features wide: none runs in FP8" in fp8_lines(decisions)[0]


@pytest.mark.parametrize("overrides,why", [
    (("model=llama-3.1-8b-instruct", "quant=4bit"), "quant=4bit stores the base in bitsandbytes' format"),
    (("model=llama-3.1-8b-instruct", "lora=none", "strategy=zero3"), "lora=none trains the base weights"),
])
def test_auto_leaves_fp8_off_and_true_is_refused_where_it_cannot_run(overrides, why):
    plan, decisions = planned(*overrides)
    assert not plan["fp8"]
    assert why in fp8_lines(decisions)[0]
    with pytest.raises(ConfigError, match=f"train.fp8=true: {why}"):
        planned(*overrides, "train.fp8=true")


def test_backward_runs_only_the_input_gradients_in_fp8_and_the_plan_counts_one_copy():
    plan, decisions = planned("model=llama-3.1-8b-instruct", "strategy=ddp", "train.fp8=backward", "micro_batch=8")
    assert plan["fp8"] and not plan["fp8_forward"]
    assert "input gradients in FP8 (the forward, and so every log-prob, stays bf16)" in fp8_lines(decisions)[0]
    off = planned("model=llama-3.1-8b-instruct", "strategy=ddp", "micro_batch=8", "train.fp8=false")[1]
    gib = lambda ds: float(next(d for d in ds if d.startswith("memory plan")).split()[2])  # noqa: E731
    shape = memory.model_shape(compose_cfg("model=llama-3.1-8b-instruct")["model"])
    assert gib(decisions) - gib(off) == pytest.approx(shape.fp8_params(4096) / 2**30, abs=0.1)


def test_auto_is_off_on_the_cpu_and_on_gpus_without_fp8_and_true_is_refused_there():
    plan, decisions = planned("model=llama-3.1-8b-instruct", "strategy=ddp", machine=A100)
    assert not plan["fp8"] and "compute capability below 8.9" in fp8_lines(decisions)[0]
    with pytest.raises(ConfigError, match="train.fp8=true: these GPUs have no FP8 tensor cores") as err:
        planned("model=llama-3.1-8b-instruct", "train.fp8=true", machine=A100)
    assert err.value.key == "train.fp8"
    cpu = build_plan(compose_cfg("cpu_procs=1"), dataclasses.replace(GPU_NODE, gpu_count=0), cwd="/w")
    assert "this run is on the CPU" in fp8_lines(cpu.decisions)[0]
    with pytest.raises(ConfigError, match="on the CPU"):
        build_plan(compose_cfg("cpu_procs=1", "train.fp8=true"), dataclasses.replace(GPU_NODE, gpu_count=0), cwd="/w")


@pytest.mark.parametrize("key,value,match", [("train.fp8", "maybe", "give true, false, backward or auto"),
                                             ("train.fp8_min_features", "8", "16 or more")])
def test_bad_fp8_values_are_refused_naming_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match) as err:
        planned("model=llama-3.1-8b-instruct", f"{key}={value}")
    assert err.value.key == key


def test_the_memory_plan_counts_two_fp8_copies_of_the_wide_weights_where_they_are_cached():
    shape = memory.model_shape(compose_cfg("model=llama-3.1-8b-instruct")["model"])
    # q, o (4096 x 4096) and gate, up, down (4096 x 14336) of 32 layers; k and v (1024 wide) stay bf16
    assert shape.fp8_params(4096) == 32 * (2 * 4096 * 4096 + 3 * 4096 * 14336)
    args = dict(bits=None, lora_r=16, lora_targets="all-linear", world=2, micro_batch=8, seq_len=512, method="dpo",
                gradient_checkpointing=False)
    for strategy, copies in (("ddp", 2), ("zero2", 2), ("zero3", 0)):
        without = memory.estimate(shape, strategy=strategy, **args).weights
        extra = copies * shape.fp8_params(4096) / 2**30
        assert memory.estimate(shape, strategy=strategy, fp8=(4096, 2), **args).weights == pytest.approx(without + extra)
    backward_only = memory.estimate(shape, strategy="ddp", fp8=(4096, 1), **args).weights  # W.T only
    assert backward_only == pytest.approx(memory.estimate(shape, strategy="ddp", **args).weights
                                          + shape.fp8_params(4096) / 2**30)
    plan_on = planned("model=llama-3.1-8b-instruct", "strategy=ddp", "micro_batch=8", "train.fp8=true")[1]
    plan_off = planned("model=llama-3.1-8b-instruct", "strategy=ddp", "micro_batch=8", "train.fp8=false")[1]
    gib = lambda ds: float(next(d for d in ds if d.startswith("memory plan")).split()[2])  # noqa: E731
    assert gib(plan_on) - gib(plan_off) == pytest.approx(2 * shape.fp8_params(4096) / 2**30, abs=0.1)


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_an_fp8_linear_gives_bf16s_output_and_input_gradient_within_fp8s_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, dtype=torch.bfloat16).requires_grad_(False)
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16)
    x[0, 0] *= 1e5  # one token far larger than the rest: a scale per row keeps the others' resolution
    one_scale = x.abs().max().float() / 448  # where one scale per tensor would round them away
    per_tensor = (x.float() / one_scale).to(torch.float8_e4m3fn).float() * one_scale
    x.requires_grad_()
    dy = torch.randn(3, 40, 512, dtype=torch.bfloat16)
    expected = linear(x)
    (expected_dx,) = torch.autograd.grad(expected, x, dy)
    assert fp8_linear.compute_frozen_linears_in_fp8(torch.nn.Sequential(linear), 16, cache_weights=True) == 1
    out = linear(x)
    (dx,) = torch.autograd.grad(out, x, dy)
    assert out.dtype == dx.dtype == torch.bfloat16 and out.shape == expected.shape
    # e4m3 keeps 3 mantissa bits: about 3.6% relative rounding per product's inputs; bf16 itself is at 0.3%
    assert 0.005 < relative_error(out, expected) < 0.06
    assert 0.005 < relative_error(out[1:], expected[1:]) < 0.06  # the ordinary tokens, beside the large one
    assert relative_error(torch.nn.functional.linear(per_tensor[1:], linear.weight.float(), linear.bias.float()),
                          expected[1:]) > 0.2
    assert 0.005 < relative_error(dx, expected_dx) < 0.06
    linear.fp8_cache_weight = False  # quantized at each use (ZeRO-3, FSDP): the same numbers
    assert torch.equal(linear(x), out)
    # train.fp8=backward: the forward in bf16, the input gradient in FP8
    linear.fp8_forward, linear.fp8_cache_weight, linear.fp8_cached = False, True, None
    out = linear(x)
    (dx_backward,) = torch.autograd.grad(out, x, dy)
    assert relative_error(out, expected) < 0.004  # bf16 (its bias added after the product: a rounding apart)
    assert torch.equal(dx_backward, dx)
    assert linear.fp8_cached[1][0] is None  # no FP8 copy of W for a forward that does not use it


def test_a_cached_fp8_weight_is_quantized_again_when_the_parameter_changes():
    linear = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    fp8_linear.compute_frozen_linears_in_fp8(torch.nn.Sequential(linear), 16, cache_weights=True)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    before = linear(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    assert relative_error(linear(x), 2 * before) < 0.02


def test_only_frozen_wide_linears_of_the_layers_switch_to_fp8(tiny_dir):
    model = lora_model_with_b(tiny_dir, 0.02)  # tiny: hidden 128, key/value 64, intermediate 352
    bases = {n for n, m in model.named_modules() if n.endswith("base_layer")}
    assert fp8_linear.compute_frozen_linears_in_fp8(model, 128, cache_weights=True) == len(bases) - 4  # not k, v
    switched = {n for n, m in model.named_modules() if getattr(m, "fp8_cache_weight", None) is not None}
    assert switched == {n for n in bases if ".k_proj" not in n and ".v_proj" not in n}
    assert not any("lora_" in n or "lm_head" in n for n in switched)  # the adapters train in bf16/fp32


def test_a_lora_model_in_fp8_gives_the_bf16_loss_and_adapter_gradients_within_fp8s_rounding(tiny_dir):
    def loss_and_grads(fp8: bool):
        model = lora_model_with_b(tiny_dir, 0.02).to(torch.bfloat16)
        if fp8:
            assert fp8_linear.compute_frozen_linears_in_fp8(model, 16, cache_weights=True) == 14
        ids = torch.randint(0, 2048, (4, 64), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for n, p in model.named_parameters() if p.requires_grad])
        return loss.item(), grads

    loss, grads = loss_and_grads(False)
    loss8, grads8 = loss_and_grads(True)
    assert loss8 == pytest.approx(loss, rel=0.01)
    assert torch.nn.functional.cosine_similarity(grads, grads8, dim=0) > 0.99
    assert relative_error(grads8, grads) < 0.1


def test_auto_is_off_where_the_model_dimensions_are_unknown():
    choice, why = fp8.auto_choice(compose_cfg("model=llama-3.1-8b-instruct"), None, None)
    assert choice is False and why.startswith("off: the model's dimensions are unknown")
