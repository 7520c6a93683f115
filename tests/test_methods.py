"""The methods beyond DPO and SFT (launcher/methods.py): KTO, ORPO and SimPO. Their settings and data are checked
before launch, the memory plan knows which keep a reference pass, and each learns on the CPU through the launcher."""
import json
import re

import pytest
import yaml

from conftest import GPU_NODE, compose_cfg, read_metrics, run_launcher, untrained_adapters
from launcher import memory, methods
from launcher.data import DataError, prepare
from launcher.errors import ConfigError
from launcher.plan import build_plan
from test_data import data_cfg, write_jsonl


@pytest.mark.parametrize("overrides,key,words", [
    (["method=kto", "micro_batch=1"], "micro_batch", "KL term"),
    (["method=kto", "method.loss_type=sigmoid"], "method.loss_type", "kto, apo_zero_unpaired"),
    (["method.loss_type=foo"], "method.loss_type", "not a DPO loss of TRL 1.16"),
    (["method.loss_type=[sigmoid,bogus]"], "method.loss_type", "bogus is not"),
    (["method.loss_type=exo_pair"], "method.label_smoothing", "label_smoothing>0"),
    (["method=orpo", "+method.precompute_ref_log_probs=true"], "method.precompute_ref_log_probs", "no reference"),
    (["method.precompute_ref_log_probs=true", "strategy=fsdp_qlora"], "method.precompute_ref_log_probs",
     "unsharded model on every GPU"),
    (["method.precompute_ref_log_probs=yes"], "method.precompute_ref_log_probs", "give true, false or auto"),
    (["method.precompute_ref_log_probs=true", "train.fp8=true"], "method.precompute_ref_log_probs",
     "would not cancel"),
    (["method=simpo", "train.padding_free=true"], "train.padding_free", "DPO's and SFT's"),
    (["method=kto", "train.group_by_length=true"], "train.group_by_length", "KL term"),
    (["method=orpo", "micro_batch_tokens=4096"], "micro_batch_tokens", "give micro_batch"),
    (["method=grpo"], "method", "Could not find"),
])
def test_bad_method_settings_are_refused_before_launch(overrides, key, words):
    with pytest.raises(Exception) as info:
        build_plan(compose_cfg("gpus=2", *overrides), GPU_NODE)
    if isinstance(info.value, ConfigError):
        assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize("overrides,on,words", [
    (["train.epochs=3", "strategy=ddp"], True, "3 epochs: the reference log-probs computed once"),
    (["train.epochs=4", "strategy=zero2"], True, "4 epochs"),
    (["train.epochs=4", "strategy=ddp", "method=kto"], False, "method=kto: measured for DPO only"),
    (["train.epochs=3", "strategy=ddp", "train.fp8=true"], False, "the reference would be computed in bf16"),
    (["train.epochs=3", "strategy=ddp", "train.fp8=backward"], True, "3 epochs"),
    (["train.epochs=2", "strategy=ddp"], False, "train.epochs=2: the pass before the first step"),
    (["train.epochs=3", "train.max_steps=100", "strategy=ddp"], False, "train.epochs=3 with train.max_steps"),
    (["train.epochs=3", "strategy=zero3"], False, "under zero3, where it has not been run"),
    (["train.epochs=3", "strategy=fsdp_qlora"], False, "under fsdp_qlora TRL 1.16 computes them with the whole"),
])
def test_auto_precomputes_the_reference_log_probs_for_several_epochs_where_it_was_run(overrides, on, words):
    plan = build_plan(compose_cfg("gpus=2", "model=qwen2.5-1.5b-instruct", *overrides), GPU_NODE)
    assert yaml.safe_load(plan.files["config.yaml"])["method"]["precompute_ref_log_probs"] is on
    line, = [d for d in plan.decisions if d.startswith("method.precompute_ref_log_probs=auto")]
    assert line.startswith(f"method.precompute_ref_log_probs=auto -> {'on' if on else 'off'}: ") and words in line


def test_precompute_given_true_is_said_and_where_it_has_not_run_that_too():
    for strategy, untried in (("ddp", False), ("zero3", True)):
        plan = build_plan(compose_cfg("gpus=2", f"strategy={strategy}", "method.precompute_ref_log_probs=true"),
                          GPU_NODE)
        line, = [d for d in plan.decisions if d.startswith("method.precompute_ref_log_probs=true")]
        assert "computed once before the first step" in line
        assert ("not run under zero3 yet" in line) is untried


def test_methods_without_a_reference_get_no_precompute_setting():
    for method in ("orpo", "simpo", "sft"):
        plan = build_plan(compose_cfg("gpus=2", f"method={method}", "train.epochs=2"), GPU_NODE)
        assert "precompute_ref_log_probs" not in yaml.safe_load(plan.files["config.yaml"])["method"]
        assert not any("precompute" in d for d in plan.decisions)


def test_kto_with_micro_batch_auto_is_sized_to_at_least_two_or_refused():
    cfg = compose_cfg("method=kto", "gpus=2", "gpu_mem_gib=80", "model=qwen2.5-1.5b-instruct")
    plan = build_plan(cfg, GPU_NODE)
    assert yaml.safe_load(plan.files["config.yaml"])["micro_batch"] >= 2
    assert any(d.startswith("micro_batch=auto -> ") for d in plan.decisions)
    with pytest.raises(ConfigError, match="all that micro_batch=auto fits"):  # a GPU that holds one row only
        build_plan(compose_cfg("method=kto", "gpus=1", "gpu_mem_gib=40", "model=qwen2.5-7b-instruct",
                               "strategy=ddp", "data.max_length=32768", "train.gradient_checkpointing=true"), GPU_NODE)


def test_the_memory_plan_knows_which_methods_keep_a_reference_and_how_many_sequences_a_row_runs():
    shape = memory.model_shape(compose_cfg("model=qwen2.5-1.5b-instruct")["model"])

    def est(method, lora_r=None):
        return memory.estimate(shape, strategy="ddp", bits=None, lora_r=lora_r, lora_targets="all-linear", world=2,
                               micro_batch=8, seq_len=512, method=method, gradient_checkpointing=True)

    full = {m: est(m) for m in methods.METHODS}
    assert full["dpo"].reference > 0 and full["kto"].reference == full["dpo"].reference  # a frozen copy each
    assert full["orpo"].reference == full["simpo"].reference == full["sft"].reference == 0
    assert est("dpo", 16).reference == est("kto", 16).reference == 0  # with LoRA: the adapter-disabled policy
    # a pair's two sequences (DPO, ORPO, SimPO) against KTO's one row; every method's LM head is chunked
    assert full["kto"].activations == pytest.approx(full["dpo"].activations / 2)
    assert full["orpo"].activations == full["simpo"].activations == full["dpo"].activations
    # micro_batch=auto on a 40 GiB GPU (LoRA): twice DPO's rows for KTO; as many pairs for ORPO (no reference)
    mb = {m: memory.largest_micro_batch(compose_cfg(f"method={m}", "model=qwen2.5-1.5b-instruct",
                                                    "data.max_length=1024", "train.gradient_checkpointing=true"),
                                        shape, "ddp", 2, 40.0) for m in ("dpo", "kto", "orpo")}
    assert mb["kto"] == 2 * mb["dpo"] and mb["orpo"] == mb["dpo"], mb


def test_dpo_loss_types_are_trls_own_list():
    from trl import DPOConfig

    listed = re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
    assert set(listed) == set(methods.DPO_LOSS_TYPES)


# ---- data: what each method takes, checked before launch ----------------------------------------------------

def pairs(n):
    return [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def test_kto_splits_each_pair_into_a_desirable_and_an_undesirable_row_and_mixes_them(tmp_path, tiny_tokenizer):
    train, held_out, report = prepare(data_cfg(write_jsonl(tmp_path / "p.jsonl", pairs(40))), "kto",
                                      tiny_tokenizer, 0)
    assert (len(train), len(held_out)) == (64, 16) and report.train_rows == 64
    assert "each of the 32 train pairs split into a desirable and an undesirable row for KTO" in report.line(64)
    labels = train["label"]
    assert labels.count(True) == labels.count(False) == 32
    assert labels[:8] != [True] * 8 and labels[:16] != [True, False] * 8  # shuffled: no run, no pair side by side
    prompts = lambda ds: {row["prompt"][0]["content"] for row in ds}  # noqa: E731
    assert not prompts(train) & prompts(held_out)  # a pair is held out whole


def test_kto_from_pairs_with_an_implicit_prompt_takes_their_common_start(tmp_path, tiny_tokenizer):
    rows = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}]}
            for i in range(10)]
    train, held_out, _ = prepare(data_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), "kto", tiny_tokenizer, 0)
    row = train[0]
    assert row["prompt"][0]["content"].startswith("q") and len(row["completion"]) == 1
    assert row["completion"][0]["content"] == ("good" if row["label"] else "bad")
    assert held_out["label"] != [True, False] * (len(held_out) // 2)  # held-out rows are mixed too


def test_kto_labels_from_a_csv_and_a_bad_cell_named(tmp_path, tiny_tokenizer):
    lines = ["prompt,completion,label"] + [f"q{i},a{i},{'true' if i % 2 else 'false'}" for i in range(10)]
    (tmp_path / "k.csv").write_text("\n".join(lines) + "\n")
    train, _, _ = prepare(data_cfg(tmp_path / "k.csv"), "kto", tiny_tokenizer, 0)
    assert set(train["label"]) == {True, False}
    (tmp_path / "k.csv").write_text("\n".join(lines[:4] + ["q9,a9,maybe"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"k.csv, row 4 of split 'train': column 'label' must be true .* got 'maybe'"):
        prepare(data_cfg(tmp_path / "k.csv"), "kto", tiny_tokenizer, 0)


@pytest.mark.parametrize("method,kept", [("orpo", 8), ("simpo", 8), ("dpo", 10)])
def test_orpo_and_simpo_lose_rows_whose_prompt_fills_max_length_which_their_trainers_would_keep(
        tmp_path, tiny_tokenizer, method, kept):
    """TRL's ORPO and CPO keep such a row with an empty answer (a 0/0 average log-prob, NaN); DPO's trainer drops it."""
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": "word " * (100 if i < 2 else 2) + f"q{i}",
                                                  "chosen": "yes", "rejected": "no"} for i in range(10)])
    write_jsonl(tmp_path / "d" / "test.jsonl", [{"prompt": f"t{i}", "chosen": "yes", "rejected": "no"}
                                                for i in range(3)])
    train, held_out, report = prepare(data_cfg(tmp_path / "d"), method, tiny_tokenizer, 0)
    assert report.prompt_too_long == 2 and (len(train), len(held_out)) == (kept, 3)


def test_kto_rows_with_labels(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 3 == 0} for i in range(20)]
    train, _, report = prepare(data_cfg(write_jsonl(tmp_path / "k.jsonl", rows)), "kto", tiny_tokenizer, 0)
    assert set(train.column_names) == {"prompt", "completion", "label"} and report.fmt.startswith("unpaired")
    assert "split" not in report.line(64)


@pytest.mark.parametrize("method,rows,words", [
    ("kto", [{"prompt": "q", "completion": "a"}], "KTO needs a 'label' column beside prompt and completion"),
    ("kto", [{"completion": "a", "label": True}], "KTO needs columns prompt, completion, label"),
    ("kto", [{"prompt": f"q{i}", "completion": "a", "label": True} for i in range(4)]
     + [{"prompt": "q9", "completion": "a", "label": "yes"}], r"k.jsonl, line 5: column 'label' must be true"),
    ("kto", [{"prompt": f"q{i}", "completion": "a", "label": 1} for i in range(4)], "line 1: column 'label'"),
    ("sft", pairs(4), r"This is a preference file \(chosen/rejected\): use method=dpo, orpo, simpo or kto"),
    ("dpo", [{"prompt": "q", "completion": "a", "label": True}], r"These are KTO's rows \(prompt/completion/label\): use method=kto"),
    ("orpo", [{"prompt": "q", "completion": "a"}], "ORPO needs columns prompt, chosen, rejected"),
])
def test_data_of_another_method_is_refused_naming_file_line_and_column(tmp_path, tiny_tokenizer, method, rows,
                                                                       words):
    with pytest.raises(DataError) as info:
        prepare(data_cfg(write_jsonl(tmp_path / "k.jsonl", rows)), method, tiny_tokenizer, 0)
    assert "k.jsonl" in str(info.value) and re.search(words, str(info.value)), str(info.value)


def test_a_label_of_another_kind_among_booleans_is_named_by_its_line(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "completion": "a", "label": True} for i in range(6)]
    rows[3]["label"] = {"x": 1}  # json cannot read this column as one type: the file is refused on reading
    with pytest.raises(DataError, match=r"k.jsonl.*(Line 4: column 'label' holds an object|line 4)"):
        prepare(data_cfg(write_jsonl(tmp_path / "k.jsonl", rows)), "kto", tiny_tokenizer, 0)


# ---- each learns on the CPU, through the launcher as a user runs it ------------------------------------------

@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_orpo_and_simpo_scoring_only_label_tokens_give_trls_loss_gradients_and_metrics(tiny_dir, tiny_tokenizer,
                                                                                        method):
    """methods.score_label_tokens_only against TRL's own whole-logits forward, on one batch of pairs of mixed lengths
    (padding, prompts) through the tiny model with LoRA."""
    import random
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    rng = random.Random(0)
    words = lambda k: " ".join(f"w{rng.randrange(300)}" for _ in range(k))  # noqa: E731
    rows = Dataset.from_list([{"prompt": words(rng.randint(3, 20)), "chosen": words(rng.randint(2, 30)),
                               "rejected": words(rng.randint(2, 30))} for _ in range(8)])
    common = dict(output_dir=str(tiny_dir / "unused"), per_device_train_batch_size=4, use_cpu=True, report_to="none",
                  remove_unused_columns=False, max_length=64)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "orpo":
                (config, trainer_class) = methods._experimental("orpo", "ORPOConfig", "ORPOTrainer")
                args = config(beta=0.1, **common)
            else:
                (config, trainer_class) = methods._experimental("cpo", "CPOConfig", "CPOTrainer")
                args = config(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, **common)
            trainer = trainer_class(model=model, args=args, train_dataset=rows, processing_class=tiny_tokenizer,
                                    peft_config=LoraConfig(r=8, target_modules="all-linear"))
        if fused:
            methods.score_label_tokens_only(trainer, nll_over_whole_chosen=method == "orpo")
            assert "concatenated_forward" in vars(trainer)  # (else both runs would be TRL's)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["prompt_input_ids"].shape[0] == 4
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
        loss.backward()
        runs.append((loss.item(), metrics, {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}))
    (loss, metrics, grads), (fused_loss, fused_metrics, fused_grads) = runs
    assert fused_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == fused_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-9, name
    for key, value in metrics.items():
        if not key.startswith("logits/"):  # (averaged over answer tokens here, over every position by TRL)
            assert fused_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert fused_metrics["logits/chosen"] != metrics["logits/chosen"]  # the fused forward ran


@pytest.mark.slow
@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_methods_learn_to_prefer_the_chosen_answer(tmp_path, tiny_dir, method):
    run = tmp_path / method
    res = run_launcher(f"run_dir={run}", f"method={method}", "train.lr=2e-3", "save_steps=1000", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_rewards/accuracies"] > 0.7, summary  # held-out pairs; chance is 0.5
    assert "held-out reward accuracy" in res.stdout and "trl.experimental" not in res.stdout + res.stderr
    assert "remove_unused_columns" not in res.stdout + res.stderr
    timed = [m for m in read_metrics(run) if "tokens_per_sec_per_gpu" in m]  # counted by us: TRL counts none here
    assert timed and all(m["tokens_per_sec_per_gpu"] > 0 for m in timed)
    assert re.search(r"^step 10/48 .* acc [01]\.\d\d, [\d,]+ tok/s/GPU", res.stdout, re.M), res.stdout


@pytest.mark.slow
def test_kto_from_pairs_learns_a_reward_gap_resumes_and_merges(tmp_path, tiny_dir):
    run = tmp_path / "kto"
    common = [f"run_dir={run}", "method=kto", "train.lr=5e-4", "save_steps=10"]
    first = run_launcher(*common, "train.max_steps=10", timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "split into a desirable and an undesirable row for KTO" in first.stdout
    second = run_launcher(*common, "train.max_steps=30", "resume=auto", "merge=true", timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"continuing from {run}/checkpoints/checkpoint-10 (step 10)" in second.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 30
    assert summary["eval_rewards/chosen"] - summary["eval_rewards/rejected"] > 0.02, summary  # 0 before training
    assert "held-out reward gap" in second.stdout
    assert untrained_adapters(run / "final") == [] and (run / "merged" / "config.json").exists()
    assert "KTO's reference pass switches 14 LoRA layers off by their flag" in (run / "logs" / "rank1.log").read_text()


def test_the_reference_is_named_by_its_config_and_files_not_by_reading_its_weights(tmp_path, tiny_dir):
    """TRL's name for its cache of precomputed reference log-probs, as the launcher gives it (model_identity):
    the same checkpoint loaded twice gets the same name, a checkpoint whose files changed or another shape does not."""
    import os
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path)

    first, again = load(tiny_dir / "model"), load(tiny_dir / "model")
    assert methods.model_identity(first) == methods.model_identity(again)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir / "model", copy)
    before = methods.model_identity(load(copy))
    assert before != methods.model_identity(first)  # another checkpoint
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten since
    assert methods.model_identity(load(copy)) != before
    with torch.no_grad():  # no weight is read: what it names is the checkpoint the weights came from
        next(again.parameters()).add_(1.0)
    assert methods.model_identity(again) == methods.model_identity(first)
    first.config.num_hidden_layers = 1
    assert methods.model_identity(first) != methods.model_identity(again)
