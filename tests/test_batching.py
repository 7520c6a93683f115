"""How rows become micro-batches (launcher/batching.py), as the planner records it."""
from dataclasses import replace

import pytest
import yaml

from conftest import CPU_NODE, GPU_NODE, compose_cfg
from launcher import memory
from launcher.errors import ConfigError
from launcher.plan import build_plan

H200X2 = replace(GPU_NODE, gpu_count=2, gpu_mem_gib=139.8, liger=True)
REAL = ["model=qwen2.5-1.5b-instruct", "gpus=2", "data.max_length=2048"]


def planned_gib(plan) -> float:
    return float(next(d for d in plan.decisions if d.startswith("memory plan: ")).split()[2])


def test_on_gpus_dpo_runs_padding_free_filled_to_the_tokens_the_memory_plan_sized():
    plan = build_plan(compose_cfg(*REAL), H200X2)
    s = plan.settings
    assert s["padding_free"] and s["attn_implementation"] == "packed_varlen" and not s["group_by_length"]
    assert "micro_batch: 8\n" in plan.files["config.yaml"]  # 8 pairs of 2 x 2048 tokens: the 32k-token cap
    assert s["token_budget"] == 8 * 2 * 2048
    assert s["metrics_sync"] == "log"  # ranks hold different numbers of pairs: TRL's per-step gathers cannot run
    assert any(d.startswith("micro_batch_tokens -> 32768") for d in plan.decisions)
    padded = build_plan(compose_cfg(*REAL, "train.padding_free=false"), H200X2)  # 8 pairs padded to 2048
    assert planned_gib(plan) == planned_gib(padded) and "micro_batch: 8\n" in padded.files["config.yaml"]


def test_one_gpu_keeps_trls_metric_gathers():
    plan = build_plan(compose_cfg(*REAL[:1], "gpus=1", *REAL[2:]), replace(H200X2, gpu_count=1))
    assert plan.settings["token_budget"] and plan.settings["metrics_sync"] == "step"


def test_a_fixed_micro_batch_stays_a_count_of_rows():
    s = build_plan(compose_cfg(*REAL, "micro_batch=4"), H200X2).settings
    assert s["padding_free"] and s["token_budget"] is None and s["metrics_sync"] == "step"


def test_a_token_budget_given_is_planned_with_its_own_tokens():
    half, full = (build_plan(compose_cfg(*REAL, f"micro_batch_tokens={n}"), H200X2) for n in (16384, 32768))
    assert half.settings["token_budget"] == 16384
    weights = 3.5  # about: the 1.5B model's bf16 weights and the adapter's optimizer
    assert planned_gib(half) - weights == pytest.approx((planned_gib(full) - weights) / 2, rel=0.05)


def test_padded_batches_on_gpus_are_grouped_by_length():
    s = build_plan(compose_cfg(*REAL, "train.padding_free=false"), H200X2).settings
    assert not s["padding_free"] and s["group_by_length"] and s["attn_implementation"] == "sdpa"
    assert s["token_budget"] is None


def test_sft_is_padding_free_through_trls_packing():
    s = build_plan(compose_cfg(*REAL, "method=sft", "data=demo_sft"), H200X2).settings
    assert s["padding_free"] and s["packing"] and s["token_budget"] is None
    s = build_plan(compose_cfg(*REAL, "method=sft", "data=demo_sft", "method.packing=false"), H200X2).settings
    assert not s["padding_free"] and not s["packing"] and s["group_by_length"]


def test_the_cpu_keeps_padded_batches_unless_asked():
    s = build_plan(compose_cfg(), CPU_NODE).settings
    assert not s["padding_free"] and not s["group_by_length"] and s["attn_implementation"] == "sdpa"
    s = build_plan(compose_cfg("train.padding_free=true"), CPU_NODE).settings
    assert s["padding_free"] and s["attn_implementation"] == "sdpa"  # transformers' packed mask on the CPU
    assert s["token_budget"] == 4 * 2 * 256  # micro_batch=auto gives 4 there


@pytest.mark.parametrize("overrides, key", [
    (("train.padding_free=false", "micro_batch_tokens=20000"), "micro_batch_tokens"),
    (("micro_batch=8", "micro_batch_tokens=20000"), "micro_batch_tokens"),
    (("micro_batch_tokens=lots",), "micro_batch_tokens"),
    (("method=sft", "data=demo_sft", "micro_batch_tokens=20000"), "micro_batch_tokens"),
    (("method=sft", "data=demo_sft", "method.packing=false", "train.padding_free=true"), "method.packing"),
    (("train.group_by_length=true",), "train.group_by_length"),
    (("train.padding_free=maybe",), "train.padding_free"),
])
def test_contradictions_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        build_plan(compose_cfg(*REAL, *overrides), H200X2)
    assert err.value.key == key


def test_auto_stays_padded_under_strategies_where_padding_free_was_not_measured():
    plan = build_plan(compose_cfg(*REAL, "strategy=zero3"), H200X2)
    assert not plan.settings["padding_free"] and plan.settings["group_by_length"]
    assert any("off under zero3, where it has not been measured" in d for d in plan.decisions)
    forced = build_plan(compose_cfg(*REAL, "strategy=zero3", "train.padding_free=true"), H200X2).settings
    assert forced["padding_free"] and forced["token_budget"] == 2 * 2048 * int(
        yaml.safe_load(build_plan(compose_cfg(*REAL, "strategy=zero3"), H200X2).files["config.yaml"])["micro_batch"])


def test_auto_stays_padded_over_4_bit_weights_where_it_was_not_measured():
    plan = build_plan(compose_cfg(*REAL, "strategy=ddp", "quant=4bit"), H200X2)
    assert not plan.settings["padding_free"]
    assert any("off with quant=4bit, where it has not been measured" in d for d in plan.decisions)
    forced = build_plan(compose_cfg(*REAL, "strategy=ddp", "quant=4bit", "train.padding_free=true"), H200X2)
    assert forced.settings["padding_free"] and forced.settings["attn_implementation"] == "packed_varlen"


def test_a_model_that_caps_its_attention_logits_runs_eager_attention_over_padded_rows(tmp_path):
    """Gemma 2's attn_logit_softcapping: SDPA and the flash kernels (padding-free batches run these) leave the cap
    out without a word; only eager attention keeps it."""
    import json

    gemma2 = {"model_type": "gemma2", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
              "attn_logit_softcapping": 50.0, "sliding_window": 4096}
    (tmp_path / "config.json").write_text(json.dumps(gemma2))
    for method, machine in (("dpo", H200X2), ("sft", H200X2), ("dpo", CPU_NODE)):
        plan = build_plan(compose_cfg(f"model.path={tmp_path}", f"method={method}",
                                      *(("gpus=2",) if machine is H200X2 else ())), machine)
        assert not plan.settings["padding_free"] and plan.settings["attn_implementation"] == "eager"
        assert any(d.startswith("attention eager: the model caps its attention logits (attn_logit_softcapping=50.0")
                   for d in plan.decisions)
        if machine is H200X2:  # where padding-free would otherwise be on
            assert ("padding-free batches off: the model caps its attention logits (attn_logit_softcapping=50.0)"
                    in plan.decisions)
    for given in ("train.padding_free=true", "method.packing=true"):
        with pytest.raises(ConfigError, match=r"caps its attention logits \(attn_logit_softcapping=50.0, Gemma 2\), "
                                              "and only eager and flex attention keep the cap"):
            build_plan(compose_cfg(f"model.path={tmp_path}", "gpus=2", "method=sft", given), H200X2)
    # flex attention keeps the cap (a score_mod) without eager's [row, row] scores: asked for, it runs, and the
    # memory plan counts no scores
    flex_cfg = compose_cfg(f"model.path={tmp_path}", "gpus=1", "model.attn_implementation=flex_attention")
    flex, eager = build_plan(flex_cfg, H200X2), build_plan(compose_cfg(f"model.path={tmp_path}", "gpus=1"), H200X2)
    assert flex.settings["attn_implementation"] == "flex_attention" and not flex.settings["padding_free"]
    assert not any(d.startswith("attention eager") for d in flex.decisions)
    assert any("model.attn_implementation=flex_attention keeps the cap too" in d for d in eager.decisions)
    shape = memory.model_shape(flex_cfg["model"])
    eager_cfg = dict(flex_cfg, model=dict(flex_cfg["model"], attn_implementation="sdpa"))  # sdpa asked: eager runs
    flex_activations, eager_activations = (memory.job_estimate(c, shape, "ddp", 1, 4).activations
                                           for c in (flex_cfg, eager_cfg))
    assert eager_activations > flex_activations
