"""The memory plan: hand-computed bytes per parameter, the peer's recorded GPU peaks, and the choices."""
import re
from dataclasses import replace

import pytest

from conftest import CPU_NODE, GPU_NODE, compose_cfg, run_launcher
from launcher import memory
from launcher.errors import ConfigError
from launcher.plan import build_plan

QWEN_1_5B = memory.Shape(1536, 8960, 28, 12, 2, 151936, True)
QWEN_7B = memory.Shape(3584, 18944, 28, 28, 4, 152064, False)
LLAMA_8B = memory.Shape(4096, 14336, 32, 32, 8, 128256, False)
LLAMA_70B = memory.Shape(8192, 28672, 80, 64, 8, 128256, False)
GIB = 2**30


def test_parameter_counts_match_the_published_models():
    assert round(QWEN_1_5B.total_params() / 1e9, 2) == 1.54
    assert round(QWEN_7B.total_params() / 1e9, 2) == 7.62
    assert QWEN_1_5B.lora_params(16, "all-linear") == 18_464_768  # what PEFT prints for r16 all-linear
    assert QWEN_1_5B.lora_params(8, ["q_proj", "v_proj"]) == 28 * 8 * ((1536 + 1536) + (1536 + 256))


def est(**kw):
    args = dict(shape=QWEN_7B, strategy="ddp", bits=None, lora_r=16, lora_targets="all-linear", world=2,
                micro_batch=1, seq_len=512, method="sft", gradient_checkpointing=True)
    args.update(kw)
    return memory.estimate(args.pop("shape"), **args)


def test_bytes_per_parameter_by_quantization():
    linear, other = QWEN_7B.linear_params(), QWEN_7B.other_params()
    lora = QWEN_7B.lora_params(16, "all-linear")
    assert est().weights * GIB == pytest.approx((linear + other) * 2 + lora * 4)  # bf16 base, fp32 adapter
    # under DDP, kbit preparation keeps the unquantized weights in float32
    assert est(bits=4).weights * GIB == pytest.approx(linear * 0.53 + other * 4 + lora * 4)
    assert est(bits=8).weights * GIB == pytest.approx(linear * 1.0 + other * 4 + lora * 4)
    assert est(bits=4, strategy="zero2").weights * GIB == pytest.approx(linear * 0.53 + other * 2 + lora * 4)


def test_optimizer_and_gradients_by_strategy():
    lora = QWEN_7B.lora_params(16, "all-linear")
    ddp = est()
    assert ddp.gradients * GIB == pytest.approx(lora * 4) and ddp.optimizer * GIB == pytest.approx(lora * 8)
    zero2 = est(strategy="zero2")  # fp32 master + 2 moments, sharded over 2 GPUs
    assert zero2.optimizer * GIB == pytest.approx(lora * 12 / 2)
    assert est(strategy="zero3").optimizer * GIB == pytest.approx(lora * 12 / 2 + 0.8 * GIB)  # + its buffers
    full_ddp = est(lora_r=None, method="sft")  # bf16 full fine-tune under torch AdamW: 2 + 2 + 4 bytes
    n = QWEN_7B.total_params()
    assert (full_ddp.weights, full_ddp.gradients, full_ddp.optimizer) == pytest.approx(
        (n * 2 / GIB, n * 2 / GIB, n * 4 / GIB))
    zero3 = est(strategy="zero3", lora_r=None)
    assert zero3.weights < full_ddp.weights / 2 + 2.0  # sharded, plus the live window
    assert est(strategy="zero3_offload", lora_r=None).optimizer == pytest.approx(0.8)  # optimizer on the CPU


def test_dpo_doubles_sequences_and_a_full_fine_tune_adds_the_reference():
    sft, dpo = est(method="sft"), est(method="dpo")
    assert dpo.activations == pytest.approx(2 * sft.activations / memory.ACT_SFT)  # 2 sequences a pair
    assert dpo.reference == 0  # LoRA: the reference is the adapter-disabled policy
    assert est(method="dpo", lora_r=None).reference == pytest.approx(QWEN_7B.total_params() * 2 / GIB)


# Peak allocated GiB per GPU measured through the launcher on 2x H200 (docs/memory.md, 2026-11-23), LoRA r16
# all-linear: (model, strategy, bits, method, micro_batch, max_length, checkpointing, liger, measured GiB).
# The first five: micro_batch 4, no Liger; the rest: the benchmark at the new defaults (docs/benchmarks.md).
# DDP's bf16 rows measured before 2026-11-24 are left out: PEFT then ran its adapters on float32 copies of
# their inputs, which the launcher no longer lets it do (ddp at micro_batch 32 went from 54.8 to 47.6 GiB).
MEASURED = [
    (QWEN_1_5B, "ddp", 4, "dpo", 4, 380, True, False, 2.83),
    (QWEN_1_5B, "zero2", None, "dpo", 4, 380, True, False, 3.68),
    (QWEN_1_5B, "zero3", None, "dpo", 4, 380, True, False, 4.94),
    (QWEN_1_5B, "fsdp_qlora", 4, "dpo", 4, 380, True, False, 1.77),
    (QWEN_1_5B, "zero3_offload", None, "dpo", 4, 380, True, False, 3.33),  # measured in a later session
    (QWEN_1_5B, "ddp", None, "dpo", 32, 384, False, True, 47.65),  # 2026-11-24
    (QWEN_1_5B, "ddp", None, "sft", 64, 384, False, True, 64.53),
    (QWEN_1_5B, "fsdp_qlora", None, "dpo", 64, 384, False, True, 105.09),
    (QWEN_1_5B, "ddp", 4, "dpo", 32, 384, False, True, 77.4),
    (QWEN_1_5B, "zero2", None, "dpo", 32, 384, False, True, 47.4),
    (QWEN_1_5B, "zero3", None, "dpo", 32, 384, False, True, 46.5),
    (QWEN_1_5B, "fsdp_qlora", 4, "dpo", 32, 384, False, True, 45.5),
    (QWEN_1_5B, "zero2", None, "dpo", 64, 384, False, True, 91.85),  # 2026-11-24 (docs/benchmarks.md)
    (QWEN_1_5B, "zero3", None, "dpo", 64, 384, False, True, 91.92),
    (QWEN_1_5B, "fsdp_qlora", 4, "dpo", 64, 384, False, True, 89.91),
    (QWEN_1_5B, "zero2", None, "sft", 64, 384, False, True, 64.4),
    (QWEN_7B, "fsdp_qlora", 4, "dpo", 16, 384, False, True, 53.1),
    (QWEN_7B, "zero3", 4, "dpo", 16, 384, False, True, 55.1),
    # 2026-11-30: Llama-3.1-70B's shape from a pre-quantized 4-bit checkpoint, 2 pairs of 384 (docs/memory.md)
    (LLAMA_70B, "fsdp_qlora", 4, "dpo", 2, 384, False, True, 53.84),
    (LLAMA_70B, "zero3", 4, "dpo", 2, 384, False, True, 88.75),
    (LLAMA_70B, "ddp", 4, "dpo", 2, 384, False, True, 92.6),  # 2026-11-30 evening (docs/benchmarks.md)
    (LLAMA_70B, "zero3", 4, "sft", 2, 384, False, True, 77.18),
    (LLAMA_70B, "fsdp_qlora", 4, "sft", 2, 384, False, True, 46.77),  # 2026-12-01
    # 2026-12-01: Llama-3.1-8B's shape, 32 pairs of 384 (ddp: its token budget of 24576, the same tokens)
    (LLAMA_8B, "ddp", None, "dpo", 32, 384, False, True, 120.6),
    (LLAMA_8B, "zero2", None, "dpo", 32, 384, False, True, 111.3),
    (LLAMA_8B, "fsdp_qlora", 4, "dpo", 32, 384, False, True, 100.9),
    (LLAMA_8B, "zero3", None, "dpo", 32, 384, False, True, 105.57),
]


@pytest.mark.parametrize("shape,strategy,bits,method,mb,length,gc,liger,measured", MEASURED)
def test_within_20_percent_of_recorded_gpu_peaks(shape, strategy, bits, method, mb, length, gc, liger, measured):
    e = est(shape=shape, strategy=strategy, bits=bits, micro_batch=mb, gradient_checkpointing=gc, seq_len=length,
            method=method, liger=liger)
    assert 0.8 <= e.total / measured <= 1.2


def test_auto_picks_the_fastest_that_fits_and_sizes_the_batch():
    roomy = build_plan(compose_cfg("model=qwen2.5-7b-instruct", "strategy=auto", "micro_batch=auto", "gpus=2",
                                   "gpu_mem_gib=80"), GPU_NODE)
    assert roomy.strategy == "ddp" and roomy.settings  # ddp is the fastest measured, and it fits
    assert any(d.startswith("strategy=auto -> ddp: the fastest that fits") for d in roomy.decisions)
    mb = [d for d in roomy.decisions if d.startswith("micro_batch=auto -> ")][0]
    chosen = int(mb.split()[2].rstrip(":"))
    cfg = compose_cfg("model=qwen2.5-7b-instruct", "gpus=2", "gpu_mem_gib=80")
    shape = memory.model_shape(cfg["model"])
    gc = roomy.settings["gradient_checkpointing"]
    assert memory.fits(memory.job_estimate(cfg, shape, "ddp", 2, chosen, gradient_checkpointing=gc), 80)
    assert not memory.fits(memory.job_estimate(cfg, shape, "ddp", 2, chosen * 2, gradient_checkpointing=gc), 80)
    tight = build_plan(compose_cfg("model=llama-3.1-8b-instruct", "lora=none", "strategy=auto", "gpus=8",
                                   "gpu_mem_gib=80", "micro_batch=1"), GPU_NODE)
    assert tight.strategy != "ddp"  # a full fine-tune of 8B with a reference copy does not fit DDP on 80 GiB
    assert any("fits" in d for d in tight.decisions)


def test_checkpointing_auto_is_off_only_when_enough_work_fits_without_it():
    roomy = build_plan(compose_cfg("model=qwen2.5-1.5b-instruct", "gpus=2", "gpu_mem_gib=139.8",
                                   "data.max_length=384"), GPU_NODE)
    assert roomy.settings["gradient_checkpointing"] is False
    assert "micro_batch: 32\n" in roomy.files["config.yaml"]  # 32 x 2 x 384 tokens: the peer's hand-tuned batch
    for sharded in ("zero3", "fsdp_qlora"):  # they gather every layer per pass: twice the tokens amortize that
        plan = build_plan(compose_cfg("model=qwen2.5-1.5b-instruct", "gpus=2", "gpu_mem_gib=139.8",
                                      "data.max_length=384", f"strategy={sharded}"), replace(GPU_NODE, liger=True))
        assert "micro_batch: 64\n" in plan.files["config.yaml"] and plan.settings["gradient_checkpointing"] is False
    tight = build_plan(compose_cfg("model=qwen2.5-7b-instruct", "quant=4bit", "gpus=2", "gpu_mem_gib=24",
                                   "data.max_length=2048"), GPU_NODE)
    assert tight.settings["gradient_checkpointing"] is True
    why = [d for d in tight.decisions if d.startswith("train.gradient_checkpointing=auto -> on: without it only")]
    assert why, tight.decisions
    fixed = build_plan(compose_cfg("model=qwen2.5-7b-instruct", "quant=4bit", "gpus=2", "gpu_mem_gib=24",
                                   "micro_batch=1", "data.max_length=512"), GPU_NODE)
    assert fixed.settings["gradient_checkpointing"] is False
    assert "train.gradient_checkpointing=auto -> off: micro_batch 1 fits without it" in fixed.decisions


def test_nothing_fits_names_the_smallest_change():
    with pytest.raises(ConfigError) as info:
        build_plan(compose_cfg("model=llama-3.1-8b-instruct", "lora=none", "strategy=auto", "gpus=2",
                               "gpu_mem_gib=16"), GPU_NODE)
    assert info.value.key == "strategy" and "the smallest change that fits: gpus=" in str(info.value)
    with pytest.raises(ConfigError, match="smallest change that fits: train.gradient_checkpointing=true"):
        build_plan(compose_cfg("model=qwen2.5-7b-instruct", "quant=4bit", "micro_batch=auto", "gpus=2",
                               "gpu_mem_gib=10", "train.gradient_checkpointing=false", "data.max_length=4096"),
                   GPU_NODE)


def test_cpu_resolves_auto_without_a_memory_plan():
    plan = build_plan(compose_cfg("strategy=auto", "micro_batch=auto"), CPU_NODE)
    assert plan.strategy == "ddp" and plan.settings["strategy"] == "ddp"
    assert "micro_batch: 4" in plan.files["config.yaml"]


def test_plan_command_prints_every_strategy_without_a_gpu():
    res = run_launcher("plan", "model=qwen2.5-7b-instruct", "quant=4bit", "gpus=2", "gpu_mem_gib=24")
    assert res.returncode == 0, res.stderr
    for strategy in memory.STRATEGIES:
        assert f"\n{strategy} " in res.stdout
    assert "weights" in res.stdout and "activ" in res.stdout and "strategy=auto would take" in res.stdout
    assert "model qwen2.5-7b-instruct: 7.62B parameters" in res.stdout
    missing = run_launcher("plan", "model=qwen2.5-7b-instruct")
    assert missing.returncode == 2 and "gpu_mem_gib" in missing.stderr
    tiny = run_launcher("plan", "gpu_mem_gib=24")
    assert re.search(r"model tiny: 0\.\d\dM parameters", tiny.stdout), tiny.stdout[:300]  # not 0.00B


def test_a_full_finetune_with_precomputed_log_probs_plans_no_frozen_reference_copy():
    """launcher.train loads no second model then (tests/test_train.py); the memory plan counts none, on the GPU and
    on the host (where ZeRO-3-offload would keep its partition)."""
    def planned(*overrides):
        plan = build_plan(compose_cfg("gpus=2", "model=qwen2.5-1.5b-instruct", "lora=none", "strategy=ddp",
                                      "micro_batch=4", *overrides), GPU_NODE)
        line, = [d for d in plan.decisions if d.startswith("memory plan:")]
        return float(re.search(r"([\d.]+) GiB per GPU", line)[1])

    copy = 1.54e9 * 2 / 2**30  # the 1.5B model's bf16 weights
    assert planned() - planned("method.precompute_ref_log_probs=true") == pytest.approx(copy, rel=0.05)
    shape = memory.model_shape(compose_cfg("model=qwen2.5-1.5b-instruct")["model"])
    on_host = [memory.host_estimate(compose_cfg("model=qwen2.5-1.5b-instruct", "lora=none", *o), shape,
                                    "zero3_offload", 2, 2) for o in (["method.precompute_ref_log_probs=true"], [])]
    assert on_host[0].offloaded < on_host[1].offloaded  # ZeRO-3-offload keeps the frozen copy's partition on the host


GEMMA2_9B = {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
             "max_position_embeddings": 8192, "tie_word_embeddings": True}


def test_eager_attention_counts_each_heads_scores_quadratic_in_the_rows_length(tmp_path):
    """Gemma 2 runs eager attention (its logit cap), which keeps [row, row] scores per head for the backward: 8 bytes
    each in every layer (measured, scripts/eager_attention_memory.py), 6 without the cap; SDPA keeps none."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(GEMMA2_9B))
    cfg = compose_cfg(f"model.path={tmp_path}", "gpus=1", "data.max_length=2048")
    shape = memory.model_shape(cfg["model"])
    sdpa = dict(cfg, model=dict(cfg["model"], attn_implementation="flash_attention_2"))
    pairs, length, scores = 2, 2048, 2 * 2 * 2048 * 2048 * 16  # rows x length^2 x heads
    for gc, layers in ((False, 42), (True, 1)):
        eager = memory.job_estimate(cfg, shape, "ddp", 1, pairs, gradient_checkpointing=gc)
        fused = memory.job_estimate(sdpa, shape, "ddp", 1, pairs, gradient_checkpointing=gc)
        assert (eager.activations - fused.activations) * GIB == pytest.approx(scores * 8 * layers)
    uncapped = dict(GEMMA2_9B, model_type="llama", attn_logit_softcapping=None)
    (tmp_path / "config.json").write_text(json.dumps(uncapped))
    asked = dict(cfg, model=dict(cfg["model"], attn_implementation="eager"))
    fused = memory.job_estimate(sdpa, shape, "ddp", 1, pairs, gradient_checkpointing=False).activations
    assert memory.job_estimate(cfg, shape, "ddp", 1, pairs, gradient_checkpointing=False).activations == fused
    eager_asked = memory.job_estimate(asked, shape, "ddp", 1, pairs, gradient_checkpointing=False)
    assert (eager_asked.activations - fused) * GIB == pytest.approx(scores * 6 * 42)
    # a packed micro-batch is one row of all its tokens
    packed = memory.job_estimate(asked, shape, "ddp", 1, pairs, gradient_checkpointing=True, tokens=8192)
    packed_fused = memory.job_estimate(sdpa, shape, "ddp", 1, pairs, gradient_checkpointing=True, tokens=8192)
    assert (packed.activations - packed_fused.activations) * GIB == pytest.approx(8192 * 8192 * 16 * 6)


def test_a_gemma2_plan_checkpoints_where_its_scores_would_not_fit(tmp_path):
    """Counted, Gemma-2-9B's scores (42 layers x 16 heads x 2048^2 x 8 bytes, 21 GiB a sequence) do not fit an H200
    without checkpointing at 2 pairs, where the plan sized 2 pairs without it before it counted them: it now turns
    checkpointing on and sizes the micro-batch under it."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(GEMMA2_9B))
    cfg = compose_cfg(f"model.path={tmp_path}", "gpus=1", "data.max_length=2048", "gpu_mem_gib=141")
    plan = build_plan(cfg, GPU_NODE)
    assert plan.settings["gradient_checkpointing"] is True
    assert plan.settings["attn_implementation"] == "eager"
    mb = yaml_micro_batch(plan)
    shape = memory.model_shape(cfg["model"])
    assert memory.fits(memory.job_estimate(cfg, shape, plan.strategy, 1, mb, gradient_checkpointing=True), 141)
    without = dict(gradient_checkpointing=False)
    assert not memory.fits(memory.job_estimate(cfg, shape, plan.strategy, 1, 2, **without), 141)
    assert memory.fits(memory.job_estimate(cfg, shape, plan.strategy, 1, 2, **without, score_bytes=0), 141)


def yaml_micro_batch(plan) -> int:
    import yaml

    return yaml.safe_load(plan.files["config.yaml"])["micro_batch"]


GEMMA2_2B = memory.Shape(2304, 9216, 26, 8, 4, 256000, True, head_dim=256)


@pytest.mark.parametrize("method,mb,measured", [("dpo", 4, 99.8), ("sft", 8, 99.0)])
def test_gemma2_within_20_percent_of_its_measured_peaks(method, mb, measured):
    """Gemma-2-2B's shape on one H200, the realistic mix at data.max_length=2048, eager attention, Liger, no
    checkpointing, LoRA's dropout kernel in SFT (docs/benchmarks.md, 2026-12-03 afternoon)."""
    e = est(shape=GEMMA2_2B, world=1, micro_batch=mb, seq_len=2048, method=method, gradient_checkpointing=False,
            liger=True, dropout_copies=False, score_bytes=memory.EAGER_SCORE_BYTES[True])
    assert 0.8 <= e.total / measured <= 1.2
    assert e.activations > 2 * est(shape=GEMMA2_2B, world=1, micro_batch=mb, seq_len=2048, method=method,
                                   gradient_checkpointing=False, liger=True, dropout_copies=False).activations
