"""launcher/lora_dropout.py: when LoRA's dropout runs in the adapter's kernel, and what the memory plan keeps for
it. The kernel itself runs on GPUs only: tests/test_lora_dropout_kernel.py."""
import dataclasses

import pytest
import yaml

from conftest import CPU_NODE, GPU_NODE, compose_cfg
from launcher import lora_dropout, memory
from launcher.errors import ConfigError
from launcher.plan import build_plan

TRITON_GPU = dataclasses.replace(GPU_NODE, triton=True, liger=True)  # a GPU machine with the [gpu] extra
TURING = dataclasses.replace(TRITON_GPU, gpu_name="Tesla T4", bf16=False, fp8=False)  # triton 3 needs 8.0+


def plan(*overrides, machine=TRITON_GPU):
    built = build_plan(compose_cfg("gpus=1", *overrides), machine, cwd="/work/project")
    return yaml.safe_load(built.files["config.yaml"])["plan"], built.decisions


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_the_kernel_runs_where_trl_keeps_dropout_and_the_launchers_lora_forward_runs(strategy):
    settings, decisions = plan("method=sft", f"strategy={strategy}", "train.lora_dropout_kernel=true")
    assert settings["lora_dropout_kernel"] is True and settings["fuse_lora_sum"] is True
    assert any(d.startswith("LoRA's dropout (p=0.05) inside each adapter's down-projection") for d in decisions)


@pytest.mark.parametrize("overrides, why", [
    (("method=dpo",), "TRL turns dropout off for method=dpo"),
    (("method=kto",), "TRL turns dropout off for method=kto"),
    (("method=orpo",), "TRL turns dropout off for method=orpo"),
    (("method=simpo",), "TRL turns dropout off for method=simpo"),
    (("method=sft", "lora.dropout=0"), "no LoRA dropout"),
    (("method=sft", "lora=none"), "no LoRA dropout"),
    (("method=sft", "lora.r=128"), "lora.r=128 is over the kernel's 64: PEFT's dropout runs"),
    (("method=sft", "quant=4bit"), "PEFT's bitsandbytes LoRA layers run"),
    (("method=sft", "train.fuse_lora_sum=false"), "train.fuse_lora_sum=false: PEFT's forward runs"),
    (("method=sft", "train.compile=true"), "train.compile=true: the compiled layers run torch's dropout"),
])
def test_the_kernel_stays_off_where_it_has_nothing_to_do(overrides, why):
    cfg = compose_cfg(*overrides)
    assert lora_dropout.why_not(cfg, "ddp") == why
    settings, decisions = plan(*overrides, "train.lora_dropout_kernel=true")
    assert settings["lora_dropout_kernel"] is False
    assert f"train.lora_dropout_kernel=true has nothing to do: {why}" in decisions  # given, not silently dropped
    assert not any("inside each adapter's down-projection" in d for d in decisions)
    auto, decisions = plan(*overrides)
    assert auto["lora_dropout_kernel"] is False and not any("lora_dropout_kernel" in d for d in decisions)


def test_sharded_strategies_run_peft_s_forward_and_so_torch_s_dropout():
    cfg = compose_cfg("method=sft")
    assert lora_dropout.why_not(cfg, "zero3").startswith("strategy=zero3 gathers the adapter's weights")
    assert lora_dropout.why_not(cfg, "fsdp_qlora").startswith("strategy=fsdp_qlora gathers")
    settings, decisions = plan("method=sft", "strategy=zero3", "train.lora_dropout_kernel=true")
    assert settings["lora_dropout_kernel"] is False
    assert any(d.startswith("train.lora_dropout_kernel=true has nothing to do: strategy=zero3") for d in decisions)


def test_auto_is_off_without_gpus_triton_or_compute_capability_8_and_true_is_refused_there():
    assert plan("method=sft", "strategy=ddp", machine=GPU_NODE)[0]["lora_dropout_kernel"] is False  # no triton
    cpu = build_plan(compose_cfg("method=sft", "cpu_procs=2"), CPU_NODE)
    assert yaml.safe_load(cpu.files["config.yaml"])["plan"]["lora_dropout_kernel"] is False
    with pytest.raises(ConfigError, match="train.lora_dropout_kernel=true needs CUDA GPUs of compute capability 8.0"):
        build_plan(compose_cfg("method=sft", "cpu_procs=2", "train.lora_dropout_kernel=true"), CPU_NODE)
    assert plan("method=sft", "strategy=ddp", machine=TURING)[0]["lora_dropout_kernel"] is False
    with pytest.raises(ConfigError, match="needs CUDA GPUs of compute capability 8.0 or newer and triton"):
        plan("method=sft", "strategy=ddp", "train.lora_dropout_kernel=true", machine=TURING)
    with pytest.raises(ConfigError, match=r"train.lora_dropout_kernel='on': give true, false or auto"):
        plan("method=sft", "train.lora_dropout_kernel=on")


def test_the_memory_plan_keeps_no_dropout_copies_where_the_kernel_runs_or_nothing_drops():
    """SFT's activations carry torch's dropout copies and masks (memory.ACT_SFT) unless the kernel runs or LoRA has
    no dropout; DPO's have none either way (TRL turns dropout off)."""
    shape = memory.Shape(1536, 8960, 28, 12, 2, 151936, True)

    def gib(method, kernel, *extra, strategy="ddp"):
        cfg = compose_cfg(f"method={method}", f"train.lora_dropout_kernel={str(kernel).lower()}", "train.liger=true",
                          "data.max_length=351", *extra)
        return memory.job_estimate(cfg, shape, strategy, 1, 64).activations

    assert gib("sft", True) * memory.ACT_SFT == pytest.approx(gib("sft", False))
    assert gib("sft", False, "lora.dropout=0") == gib("sft", True)
    assert gib("sft", True, strategy="zero3") == pytest.approx(gib("sft", False, strategy="zero3"))  # PEFT's dropout
    assert gib("dpo", True) == gib("dpo", False)


def sized(method, gpu_mem_gib, *extra):
    settings, decisions = plan(f"method={method}", "model=qwen2.5-1.5b-instruct", f"gpu_mem_gib={gpu_mem_gib}", *extra)
    return settings, [d for d in decisions if "inside each adapter's down-projection" in d]


def test_auto_runs_the_kernel_wherever_it_can_and_sizes_the_job_with_its_memory():
    """Measured as fast as torch's dropout or faster in SFT (1.5B and 8B shapes) with 16-24 GiB less: auto runs it
    wherever it can, and the memory plan's smaller activations size the job (the Qwen2.5-1.5B shape)."""
    on_h200, lines = sized("sft", 139.8)
    assert on_h200["lora_dropout_kernel"] is True
    assert len(lines) == 1 and "4.4-4.8% faster on the realistic mix" in lines[0]
    on_24, _ = sized("sft", 24)  # torch's dropout copies would need checkpointing here
    assert on_24["lora_dropout_kernel"] is True and on_24["gradient_checkpointing"] is False
    torch_24, _ = sized("sft", 24, "train.lora_dropout_kernel=false")
    assert torch_24["gradient_checkpointing"] is True
    zero3, decisions = plan("method=sft", "model=qwen2.5-1.5b-instruct", "strategy=zero3")
    assert zero3["lora_dropout_kernel"] is False  # PEFT's forward runs there: auto says nothing of the kernel
    assert not any("lora_dropout_kernel" in d or "down-projection" in d for d in decisions)
    dpo, decisions = plan("method=dpo", "model=qwen2.5-1.5b-instruct", "gpu_mem_gib=24")
    assert dpo["lora_dropout_kernel"] is False  # TRL turns dropout off: nothing to do
    assert not any("lora_dropout_kernel" in d or "down-projection" in d for d in decisions)


def test_the_plan_subcommand_settles_the_kernel_as_a_launch_and_refuses_true_where_triton_cannot_run():
    """`python -m launcher plan` (as_launched): auto is off where the strategy runs PEFT's forward, and true on a GPU
    below compute capability 8.0 is refused, not taken for a job that does not fit."""
    from launcher.__main__ import as_launched

    assert as_launched(compose_cfg("method=sft", "strategy=ddp"), TRITON_GPU, 1, 1)["train"]["lora_dropout_kernel"]
    zero3 = as_launched(compose_cfg("method=sft", "strategy=zero3"), TRITON_GPU, 1, 1)
    assert zero3["train"]["lora_dropout_kernel"] is False
    with pytest.raises(ConfigError, match="compute capability 8.0 or newer"):
        as_launched(compose_cfg("method=sft", "train.lora_dropout_kernel=true"), TURING, 1, 1)
    with pytest.raises(ConfigError, match="train.lora_one_node=true needs CUDA GPUs of compute capability 8.0"):
        as_launched(compose_cfg("train.lora_one_node=true"), TURING, 1, 1)


@pytest.mark.parametrize("method", ["dpo", "sft", "kto"])
@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_lora_linears_run_as_one_node_with_or_without_dropout(method, strategy):
    settings, decisions = plan(f"method={method}", f"strategy={strategy}")
    assert settings["lora_one_node"] is True
    assert settings["lora_dropout_kernel"] is (method == "sft")  # the one node drops only where TRL keeps dropout
    assert any(d.startswith("each LoRA linear and its frozen base layer run as one autograd node") for d in decisions)
    off, decisions = plan(f"method={method}", f"strategy={strategy}", "train.lora_one_node=false")
    assert off["lora_one_node"] is False and not any("one autograd node" in d for d in decisions)


@pytest.mark.parametrize("overrides, why", [
    (("lora=none",), "no LoRA"),
    (("lora.r=128",), "lora.r=128 is over the kernel's 64"),
    (("quant=4bit",), "PEFT's bitsandbytes LoRA layers run"),
    (("strategy=zero3",), "strategy=zero3 gathers the adapter's weights in module hooks: PEFT's forward runs"),
    (("train.fuse_lora_sum=false",), "train.fuse_lora_sum=false: PEFT's forward runs"),
    (("train.compile=true",), "train.compile=true: the compiled layers run autograd's ops"),
    (("method=sft", "train.lora_dropout_kernel=false"),
     "LoRA's dropout runs in torch (train.lora_dropout_kernel), between the base and the adapter"),
])
def test_no_one_node_where_the_launchers_forward_or_a_plain_base_does_not_run(overrides, why):
    settings, decisions = plan("strategy=ddp", *overrides, "train.lora_one_node=true")
    assert settings["lora_one_node"] is False
    assert f"train.lora_one_node=true has nothing to do: {why}" in decisions  # given, not silently dropped
    auto, decisions = plan("strategy=ddp", *overrides)
    assert auto["lora_one_node"] is False and not any("lora_one_node" in d for d in decisions)


def test_the_one_node_runs_beside_fp8_over_the_layers_fp8_leaves_and_sft_names_the_real_reason():
    settings, decisions = plan("strategy=ddp", "train.fp8=backward")
    assert settings["lora_one_node"] is True
    assert any("one autograd node (not over the base layers train.fp8 computes in FP8" in d for d in decisions)
    _, decisions = plan("method=sft", "strategy=zero3", "train.lora_one_node=true")
    assert ("train.lora_one_node=true has nothing to do: strategy=zero3 gathers the adapter's weights in module hooks: "
            "PEFT's forward runs" in decisions)


def test_one_node_auto_is_off_without_triton_and_true_is_refused_there():
    assert plan("strategy=ddp", machine=GPU_NODE)[0]["lora_one_node"] is False  # no triton
    assert plan("strategy=ddp", machine=TURING)[0]["lora_one_node"] is False
    with pytest.raises(ConfigError, match="train.lora_one_node=true needs CUDA GPUs of compute capability 8.0"):
        build_plan(compose_cfg("cpu_procs=2", "train.lora_one_node=true"), CPU_NODE)
    with pytest.raises(ConfigError, match=r"train.lora_one_node='on': give true, false or auto"):
        plan("train.lora_one_node=on")
