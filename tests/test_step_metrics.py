"""launcher/step_metrics.py: the same 2-rank run on the CPU with TRL's per-step gathers and with one per log."""
import json

import pytest

from conftest import read_metrics, run_launcher

pytestmark = pytest.mark.slow


def runs_with_each_sync(tmp_path, *overrides):
    runs = {}
    for sync in ("step", "log"):
        run = tmp_path / sync
        res = run_launcher(f"run_dir={run}", "train.max_steps=10", f"train.metrics_sync={sync}", *overrides,
                           timeout=600)
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        runs[sync] = run
    assert "training metrics gathered across ranks at each log" in (runs["log"] / "logs" / "rank1.log").read_text()
    step, log = ([r for r in read_metrics(runs[s]) if "loss" in r] for s in runs)
    assert [r["step"] for r in step] == [r["step"] for r in log] == [5, 10]
    for a, b in zip(step, log):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]  # the training itself is untouched
        assert a["num_tokens"] == b["num_tokens"]  # both ranks' tokens, summed
        # ratios over tokens: the ranks' ratios averaged, where TRL pools their tokens
        for key in ("entropy", "mean_token_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=0.05), key
    held_out = [json.loads((runs[s] / "summary.json").read_text()) for s in runs]
    assert held_out[0]["eval_loss"] == held_out[1]["eval_loss"]
    return step, log


def test_dpo_metrics_gathered_at_log_are_the_ranks_average_and_training_is_unchanged(tmp_path, tiny_dir):
    step, log = runs_with_each_sync(tmp_path)
    for a, b in zip(step, log):
        # averages over pairs: each rank holds 4 of the 8, so the mean of the ranks' means is the mean. Rank 0's
        # own values differ (its margins and log-probs, over its 4 pairs): a missing gather fails here
        for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_sft_metrics_gathered_at_log_keep_the_token_count_and_the_loss(tmp_path, tiny_dir):
    runs_with_each_sync(tmp_path, "method=sft", "data=demo_sft")
