"""launcher/bench_table.py: the benchmark's table."""
from launcher import bench_table


def test_table_marks_failed_cases():
    rows = [dict(case="ddp", mix="uniform", strategy="ddp", quant="none", micro_batch=32, checkpointing=False,
                 liger=True, fp8=True, mfu_fp8=0.25, step_s=0.5, per_s_per_gpu=64.0, tokens_per_s_per_gpu=44800, padding=0.25, mfu=0.5,
                 peak_gib=50.0, plan_gib=48.0, train_metric=0.6, eval_metric=0.55, wall_s=60),
            dict(case="zero3", wall_s=12, error="RuntimeError: boom")]
    rows[0]["clock"] = "between logs"
    text = bench_table.table(rows)
    assert ("| ddp | uniform | ddp | none | 32 | off | on | on | between logs | 0.500 | 64.0 | 44800 | 25% | 50.0% "
            "| 25.0% | 50.0 | 48.0 |") in text
    assert "failed: RuntimeError: boom" in text.splitlines()[-1]


def test_a_case_stopped_by_the_budget_keeps_its_row_and_one_not_run_says_so():
    rows = [dict(case="ddp", step_s=0.7, tokens_per_s_per_gpu=3987, wall_s=73, stopped_at_s=71),
            dict(case="zero2", not_run="less than 30 s of its time (--timeout, --budget-s) was left")]
    last_cells = [line.rsplit("|", 2)[1] for line in bench_table.table(rows).splitlines()[2:]]
    assert last_cells == [" 73 (stopped at its 71 s limit) ", " - (not run: less than 30 s of its time (--timeout, "
                                                                "--budget-s) was left) "]
