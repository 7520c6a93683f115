"""launcher.train end to end on the CPU: 2 processes under torchrun (gloo), real TRL/PEFT/Trainer runs."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import read_metrics, run_launcher, untrained_adapters, zero3_on_cpu

pytestmark = pytest.mark.slow


def test_dpo_default_learns_and_logs_per_rank(tmp_path, tiny_dir):
    run = tmp_path / "dpo"
    res = run_launcher(f"run_dir={run}", timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_rewards/accuracies"] >= 0.8  # chance is 0.5 (and 0 before training: margins are 0)
    assert summary["eval_rewards/margins"] > 0
    assert "wrapped in DistributedDataParallel (gradient_as_bucket_view=True, broadcast_buffers=False)" in res.stdout
    assert "held-out reward accuracy" in res.stdout
    assert res.stdout.count("world size 2") == 1  # the banner comes from rank 0 only
    # a quiet console: progress lines with an ETA (not a terminal here), no library noise, which the logs keep
    assert re.search(r"^step 1/48 \(2%\), 0:\d\d elapsed, ETA \?$", res.stdout, re.M), res.stdout
    assert re.search(r"^step 10/48 \(21%\), .* ETA \d+:\d\d, loss 0\.\d+, acc [01]\.\d\d", res.stdout, re.M)
    for noise in ("FutureWarning", "Setting accelerator to CPU", "OMP_NUM_THREADS", "Tokenizing", "Loading weights"):
        assert noise not in res.stdout + res.stderr
    assert "`broadcast_buffers` is deprecated" in (run / "logs" / "rank1.log").read_text()
    assert (run / "logs" / "rank0.log").exists() and (run / "logs" / "rank1.log").exists()
    assert ("host work trimmed: package lookups cached; parameters counted once for the FLOP log; gradient "
            "checkpointing known to be off; DPO's reference pass switches 14 LoRA layers off by their flag"
            in (run / "logs" / "rank1.log").read_text())  # every rank trims its own
    metrics = read_metrics(run)
    assert any("rewards/accuracies" in m for m in metrics)
    # tokens/s per GPU from TRL's count of the non-padding tokens of both ranks (no per-step read-back of its own)
    timed = [m for m in metrics if "tokens_per_sec_per_gpu" in m]
    assert [m["step"] for m in timed] == [m["step"] for m in metrics if "loss" in m][:len(timed)] and len(timed) >= 2
    before = {"step": 0, "num_tokens": 0}
    for m in timed:
        per_step = (m["num_tokens"] - before["num_tokens"]) / (m["step"] - before["step"])
        assert m["tokens_per_sec_per_gpu"] * m["step_seconds"] * 2 == pytest.approx(per_step, rel=0.01)
        before = m
    assert (run / "final" / "adapter_config.json").exists() and (run / "final" / "tokenizer.json").exists()


def test_sft_learns_and_the_merged_model_loads_and_generates(tmp_path, tiny_dir):
    run = tmp_path / "sft"
    res = run_launcher(f"run_dir={run}", "method=sft", "data=demo_sft", "train.lr=2e-3", "train.max_steps=30",
                       "merge=true", "train.profile_steps=[29,40]", "train.step_clock=true",
                       "train.dataloader_workers=1", timeout=600)  # batches collated in a worker process
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert losses[-1] < losses[0] - 0.5
    clocked = [line.split() for line in (run / "step_clock.txt").read_text().splitlines()]  # rank 0's, one per step
    assert [int(n) for n, _ in clocked] == list(range(1, 31)) and all(0 < float(t) < 60 for _, t in clocked)
    profile = (run / "profile.txt").read_text()  # rank 0's profile up to the last step, 30 (CPU ops only here)
    assert profile.startswith("steps 29-30 on rank 0: ") and "by CPU time:" in profile and "aten::mm" in profile
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"m = AutoModelForCausalLM.from_pretrained('{run}/merged')\n"
            f"t = AutoTokenizer.from_pretrained('{run}/final')\n"
            "assert not any('lora' in n for n, _ in m.named_parameters())\n"
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'What is 2 + 3?'}], add_generation_prompt=True,"
            " return_tensors='pt', return_dict=True)\n"
            "out = m.generate(**ids, max_new_tokens=8, do_sample=False)\n"
            "print('GENERATED', out.shape[1] - ids['input_ids'].shape[1])\n")
    gen = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "GENERATED 8" in gen.stdout or "GENERATED" in gen.stdout and int(gen.stdout.split()[-1]) > 0


def test_interrupted_run_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_dir):
    run = tmp_path / "resume"
    args = [f"run_dir={run}", "train.max_steps=30", "save_steps=5", "train.save_total_limit=10"]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "checkpoint-10" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the interruption"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not (run / "final").exists()
    done = sorted(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/checkpoint-*/COMPLETE"))
    # a half-written newer checkpoint must be skipped, never loaded
    fake = run / "checkpoints" / f"checkpoint-{done[-1] + 1}"
    fake.mkdir()
    (fake / "trainer_state.json").write_text("{")

    res = run_launcher(*args, "resume=auto", timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert f"skipping {fake}: incomplete" in res.stdout + (run / "logs" / "rank0.log").read_text()
    assert f"continuing from {run}/checkpoints/checkpoint-{done[-1]} (step {done[-1]})" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_step"] == 30
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps[-1] == 30 and steps.count(done[-1] + 5) >= 1  # went on after the checkpoint
    # the summary's train loss is this launch's mean (the Trainer divides it by every step, the earlier ones too)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m and m["step"] > done[-1]]
    summary = json.loads((run / "summary.json").read_text())
    assert min(losses) * 0.8 <= summary["train_loss"] <= max(losses) * 1.2, (summary, losses)

    # again, at its last step: nothing is left to train; the Trainer would run a step 31 of 30 and save it
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file())
    again = run_launcher(*args, "resume=auto", timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "checkpoint-30 is at step 30 and train.max_steps=30: nothing is left to train" in again.stdout
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()) == before


def test_data_error_stops_before_training_with_a_clear_message(tmp_path, tiny_dir):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n' * 20)
    res = run_launcher(f"run_dir={tmp_path}/run", f"data.path={bad}", timeout=600)
    assert res.returncode == 2
    assert f"data error: data.path={bad}: DPO needs columns prompt, chosen, rejected; missing rejected" in res.stderr
    assert not (tmp_path / "run").exists()  # found by the launcher's preflight, before any rank or file


def test_full_finetune_dpo_with_wandb_offline(tmp_path, tiny_dir):
    """lora=none: DPO with an explicit frozen reference model; logging=wandb without a key goes offline, no hang."""
    run = tmp_path / "full"
    res = run_launcher(f"run_dir={run}", "lora=none", "logging=wandb", "train.max_steps=4", "save_steps=4",
                       "data.max_rows=80", timeout=600, env={"WANDB_API_KEY": ""})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "wandb: offline mode" in res.stdout
    assert list(run.glob("wandb/offline-run-*")), "no offline wandb run in the run directory"
    assert "parameters: 631,936 trainable of 631,936 (100.00%)" in res.stdout  # every weight trains
    assert (run / "final" / "model.safetensors").exists() and not (run / "final" / "adapter_config.json").exists()


def test_zero3_checkpoints_resumes_and_merges_on_deepspeeds_cpu_accelerator(tmp_path, tiny_dir):
    run, train = zero3_on_cpu(tmp_path, tiny_dir)
    first = train(4)
    assert first.returncode == 0, first.stderr[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    assert "wrapped in DeepSpeedEngine" in log and "ZeRO-3 fetches whole layers: 2 Qwen2DecoderLayer" in log
    # The merge runs on rank 0 alone; it used to hang there (from_pretrained inside ZeRO-3's zero.Init).
    second = train(6, resume="auto", merge=True, report={"samples": 2, "max_new_tokens": 4})
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    assert "continuing from" in log and "checkpoint-4" in log
    # every rank took part in generating the sample answers (ZeRO-3 holds a shard of each weight per rank)
    samples = json.loads((run / "samples.json").read_text())
    assert samples["note"] == "" and samples["base"] == "the same model with its LoRA adapter disabled"
    assert len(samples["samples"]) == 2 and all(s["prompt_text"].endswith("assistant\n") for s in samples["samples"])
    assert json.loads((run / "summary.json").read_text())["global_step"] == 6
    assert (run / "merged" / "config.json").exists()
    # With whole layers, the first layer's adapter once got no gradient (launcher/modeling.py says why)
    assert untrained_adapters(run / "final") == []


def test_zero3_whole_layers_train_every_sft_adapter_on_the_cpu(tmp_path, tiny_dir):
    """SFT failed in its first backward with whole layers on 2x H200 until the fix; the cause reproduced here (see
    modeling.fetch_whole_layers_under_zero3). Whole layers are the default with LoRA."""
    run, train = zero3_on_cpu(tmp_path, tiny_dir, "method=sft", "data=demo_sft")
    res = train(3)
    assert res.returncode == 0, res.stderr[-3000:]
    assert untrained_adapters(run / "final") == []


def test_precomputed_reference_log_probs_train_as_the_inline_ones_on_two_ranks(tmp_path, tiny_dir):
    """TRL caches them beside the dataset's files: launcher.train puts those in run_dir, where both ranks read
    them (in a process's temporary folder the other rank could not open them)."""
    runs = {}
    for on in (True, False):
        run = runs[on] = tmp_path / f"precompute-{on}"
        res = run_launcher(f"run_dir={run}", f"method.precompute_ref_log_probs={str(on).lower()}",
                           "train.max_steps=10", "save_steps=10", "report.samples=0", timeout=600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    import datasets

    cached = [datasets.Dataset.from_file(str(f)) for f in (runs[True] / "datasets" / "train").glob("cache-*.arrow")]
    with_logps = [d for d in cached if "ref_chosen_logps" in d.column_names]
    assert with_logps and len(with_logps[0]) == 379  # every train row's, whichever rank trains on it
    assert not (runs[False] / "datasets").exists()
    logged = [[m for m in read_metrics(runs[on]) if "loss" in m] for on in (True, False)]
    assert [m["step"] for m in logged[0]] == [m["step"] for m in logged[1]] == [5, 10]
    for pre, inline in zip(*logged):
        for key in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected"):
            assert pre[key] == pytest.approx(inline[key], rel=1e-4, abs=1e-6), key


def test_compiled_decoder_layers_train_as_the_eager_ones(tmp_path, tiny_dir):
    """train.compile=true: each decoder layer torch.compile'd (inductor, accelerate's regional compilation); the
    losses step for step as without it, and the console says what was compiled."""
    losses = {}
    for on in (True, False):
        run = tmp_path / f"compile-{on}"
        # padding-free: its patched forwards must reach the compiled layers (a compiled copy of the model missed them)
        res = run_launcher(f"run_dir={run}", f"train.compile={str(on).lower()}", "train.padding_free=true",
                           "cpu_procs=1", "train.max_steps=6", "train.logging_steps=1", "save_steps=6",
                           "report.samples=0", timeout=900)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        losses[on] = [m["loss"] for m in read_metrics(run) if "loss" in m]
        if on:
            graphs = re.search(r"^train\.compile: (\d+) graphs compiled in the first step \([\d.]+ s\), 0 graph "
                               r"breaks$", res.stdout, re.M)
            assert graphs and int(graphs[1]) >= 2, res.stdout  # the layer's graph and the others' at least
    assert len(losses[True]) == 6 and losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_a_full_finetune_with_precomputed_log_probs_keeps_no_frozen_copy(tmp_path, tiny_dir):
    """lora=none: TRL computes the reference log-probs with the policy before its first step (its weights are the
    reference's then), so launcher.train loads no second model to keep beside it."""
    run = tmp_path / "full"
    res = run_launcher(f"run_dir={run}", "lora=none", "method.precompute_ref_log_probs=true", "train.max_steps=4",
                       "save_steps=4", "data.max_rows=80", "report.samples=0", timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert (run / "logs" / "rank0.log").read_text().count(" launcher DEBUG loading ") == 1  # the policy only
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 4 and "eval_rewards/accuracies" in summary


@pytest.mark.parametrize("family, method, targets", [
    ("gpt2", "dpo", ["c_attn", "c_fc", "c_proj"]),  # other config names; Conv1D layers, no gate
    ("phi3", "sft", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),  # fused projections
])
def test_a_local_model_of_another_family_trains(tmp_path, tiny_dir, family, method, targets):
    """A user's model.path of another architecture, tiny and random: planned (its shape under other names), its
    every linear layer adapted (lora.target_modules=all-linear), trained, and named after its folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    size = ({"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024} if family == "gpt2" else
            {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024})
    config = AutoConfig.for_model(family, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=None,
                                  eos_token_id=tok.eos_token_id, **size)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "models" / f"tiny-{family}")
    run = tmp_path / "run"
    extra = ["data=demo_sft"] if method == "sft" else []
    res = run_launcher(f"model.path={tmp_path}/models/tiny-{family}", f"model.tokenizer={tiny_dir}/tokenizer",
                       f"method={method}", *extra, "train.max_steps=10", "train.logging_steps=2", f"run_dir={run}",
                       timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    adapted = json.loads((run / "final" / "adapter_config.json").read_text())["target_modules"]
    assert sorted({name.rsplit(".", 1)[-1] for name in adapted}) == targets
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    if method == "dpo":
        assert json.loads((run / "summary.json").read_text())["eval_rewards/accuracies"] >= 0.8  # chance: 0.5
    assert f"run_name: {method}-tiny-{family}-" in (run / "config.yaml").read_text()
