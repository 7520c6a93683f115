"""The benchmark (launcher/bench.py): its arithmetic, its table, the plan it measures, and a real CPU run."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from conftest import GPU_NODE, compose_cfg, read_metrics
from launcher import ROOT, bench
from launcher.plan import build_plan


def test_flops_per_token_counts_what_the_step_computes():
    n = 1.0
    assert bench.flops_per_token(n, "dpo", lora=True, precomputed_ref=False) == 6  # fwd, input grads, reference
    assert bench.flops_per_token(n, "dpo", lora=True, precomputed_ref=True) == 4
    assert bench.flops_per_token(n, "dpo", lora=False, precomputed_ref=False) == 8  # + weight gradients
    assert bench.flops_per_token(n, "sft", lora=True, precomputed_ref=False) == 4


def test_case_names_all_means_every_case_in_order():
    assert bench.case_names("all") == list(bench.CASES) and bench.case_names(" ddp, zero3,") == ["ddp", "zero3"]


def test_every_launcher_case_plans_on_the_benchmark_machine():
    h200 = replace(GPU_NODE, gpu_count=2, gpu_mem_gib=139.8, liger=True, triton=True)
    for name, case in bench.CASES.items():
        if case.kind == "launcher":
            plan = build_plan(compose_cfg(f"model={case.preset}", "gpus=2", f"method={case.method}",
                                          f"data.max_length={bench.MAX_LENGTH[case.mix]}", *case.overrides), h200)
            assert plan.world_size == 2, name


def test_a_case_gets_what_is_left_of_the_budget_and_none_where_it_could_not_reach_a_step():
    assert bench.case_timeout(300, None, now=1000.0) == 300  # no --budget-s: the case's own limit
    assert bench.case_timeout(300, deadline=1100.0, now=1000.0) == 100
    assert bench.case_timeout(300, deadline=5000.0, now=1000.0) == 300
    assert bench.case_timeout(300, deadline=1000.0 + bench.MIN_CASE_S - 1, now=1000.0) is None


def test_the_benchmark_job_with_defaults_is_the_measured_ddp_plan():
    """docs/benchmarks.md measured strategy=ddp fastest; the defaults (strategy=auto) must plan exactly that run."""
    h200 = replace(GPU_NODE, gpu_count=2, gpu_mem_gib=139.8, liger=True, triton=True)
    job = ["model=qwen2.5-1.5b-instruct", "gpus=2", "data.max_length=384"]
    auto, ddp = (build_plan(compose_cfg(*job, *extra), h200) for extra in ([], ["strategy=ddp"]))
    assert auto.strategy == "ddp"
    for plan in (auto, ddp):
        assert plan.settings["gradient_checkpointing"] is False and plan.settings["liger"] is True
        assert plan.settings["fuse_lora_sum"] is True and plan.settings["adapter_input_cast"] is False
        assert "micro_batch: 32\n" in plan.files["config.yaml"]
    assert auto.files["accelerate.yaml"] == ddp.files["accelerate.yaml"]


def test_bench_runs_a_case_through_the_launcher_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "launcher.bench", "--cases", "ddp-resumed", "--preset", "tiny", "--gpus", "0",
                          "--steps", "20", "--assets", str(tmp_path / "assets"), "--out", str(out), "--profile-steps", "16,17"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    row = json.loads((out / "bench.json").read_text())["results"][0]
    assert row["case"] == "ddp-resumed" and row["micro_batch"] == 4  # micro_batch=auto on the CPU
    assert row["step_s"] > 0 and abs(row["per_s_per_gpu"] - 4 / row["step_s"]) < 1e-6
    assert 0 <= row["train_metric"] <= 1  # DPO reward accuracy
    assert "| ddp-resumed | uniform | ddp | none | 4 |" in (out / "bench.md").read_text()
    # saved at its last step, then resume=auto to step 22 (read after the row: the timed steps are the first run's)
    assert row["resumed"] == "20->22" and row["load_s"] >= 0 and row["host_gib"] >= 0
    # read from the launcher's own progress lines: the imports and the model come before step 1
    assert row["to_first_step_s"] > 5 and 0 <= row["after_last_step_s"] < row["wall_s"] - row["to_first_step_s"]
    assert (out / "runs" / "ddp-resumed" / "checkpoints" / "checkpoint-22").is_dir()
    # logged every 5 steps: 1-5 warm up, 16-17 were profiled (in 16-20), so the median is of 6-10 and 11-15
    metrics = read_metrics(out / "runs" / "ddp-resumed")
    timed = {m["step"]: m["step_seconds"] for m in metrics if "step_seconds" in m and m["step"] <= 20}
    assert sorted(timed) == [5, 10, 15, 20]
    assert row["step_s"] == pytest.approx((timed[10] + timed[15]) / 2)
    assert (out / "runs" / "ddp-resumed" / "profile.txt").read_text().startswith("steps 16-17 on rank 0")


def test_a_clocked_case_is_timed_by_single_steps_as_the_peer_is(tmp_path):
    """train.step_clock: the median of the single synced steps past warm-up, the profiled ones left out."""
    cfg = {"train": {"profile_steps": [9, 10], "grad_accum": 1}, "micro_batch": 32, "method": {},
           "plan": {"gradient_checkpointing": False, "liger": True, "strategy": "ddp"}, "quant": {"name": "none"},
           "lora": {"r": 16}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    logged = [{"step": s, "loss": 0.69, "step_seconds": 0.6, "tokens_per_sec_per_gpu": 1000.0} for s in (5, 10, 15)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    clocked = {1: 2.0, 2: 0.9, 3: 0.9, 4: 0.9, 5: 0.9, 6: 0.50, 7: 0.52, 8: 0.54, 9: 3.0, 10: 3.0, 11: 0.56}
    (tmp_path / "step_clock.txt").write_text("".join(f"{n} {t}\n" for n, t in clocked.items()))
    row = bench.read_launcher_run(tmp_path, bench.CASES["defaults-clocked"], n_params=1.5e9)
    assert row["clock"] == "per step, synced" and row["step_s"] == pytest.approx(0.53)  # of 6, 7, 8, 11
    assert row["per_s_per_gpu"] == pytest.approx(32 / 0.53)
    assert row["tokens_per_s_per_gpu"] == pytest.approx(1000.0 * 0.6 / 0.53)  # the logged tokens per step
    (tmp_path / "step_clock.txt").unlink()
    assert bench.read_launcher_run(tmp_path, bench.CASES["defaults"], 1.5e9)["clock"] == "between logs"
    (tmp_path / "metrics.jsonl").write_text(json.dumps(logged[0]) + "\n")  # stopped by the budget at step 5
    with pytest.raises(ValueError, match="no step timed: none was logged after the 5 warm-up steps"):
        bench.read_launcher_run(tmp_path, bench.CASES["defaults"], 1.5e9)
    (tmp_path / "config.yaml").unlink()
    with pytest.raises(ValueError, match="the run stopped before it wrote its config.yaml"):
        bench.read_launcher_run(tmp_path, bench.CASES["defaults"], 1.5e9)



def test_seconds_to_the_first_step_and_after_the_last_read_from_either_sides_progress():
    launcher_lines = [(1.0, "launcher: torchrun ...\n"), (20.5, "step 1/20 (5%), 0:01 elapsed, ETA ?\n"),
                      (30.0, "step 20/20 (100%), 0:10 elapsed, ETA 0:00, loss 0.6\n"), (31.0, "done\n"), (36.5, "")]
    assert bench.start_and_exit_seconds(launcher_lines, 20) == {"to_first_step_s": 20.5, "after_last_step_s": 6.5}
    # the peer's tqdm bar, whose carriage returns end lines when read as text
    peer_lines = [(3.0, "  0%|          | 0/20 [00:00<?, ?it/s]\n"), (25.0, "  5%|▌         | 1/20 [00:01<00:19]\n"),
                  (40.0, "100%|██████████| 20/20 [00:15<00:00]\n"), (41.0, "100%|██████████| 20/20 [00:15<00:00]\n"),
                  (50.0, "")]
    assert bench.start_and_exit_seconds(peer_lines, 20) == {"to_first_step_s": 25.0, "after_last_step_s": 9.0}
    assert bench.start_and_exit_seconds([(1.0, "crashed\n"), (2.0, "")], 20) == {"to_first_step_s": None,
                                                                                 "after_last_step_s": None}
