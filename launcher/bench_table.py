"""The benchmark's table (launcher/bench.py writes it to bench.md): one row per case, the columns docs/benchmarks.md
explains; a case that failed, was stopped at its time limit or did not run says so in its last cell."""
from __future__ import annotations

COLUMNS = [("case", "{}"), ("mix", "{}"), ("strategy", "{}"), ("quant", "{}"), ("micro_batch", "{}"),
           ("checkpointing", "{}"), ("liger", "{}"), ("fp8", "{}"), ("clock", "{}"), ("step_s", "{:.3f}"),
           ("per_s_per_gpu", "{:.1f}"), ("tokens_per_s_per_gpu", "{:.0f}"), ("padding", "{:.0%}"), ("mfu", "{:.1%}"),
           ("mfu_fp8", "{:.1%}"), ("peak_gib", "{:.1f}"), ("plan_gib", "{:.1f}"), ("train_metric", "{:.3f}"),
           ("eval_metric", "{:.3f}"), ("load_s", "{:.0f}"), ("host_gib", "{:.1f}"), ("resumed", "{}"),
           ("to_first_step_s", "{:.0f}"), ("after_last_step_s", "{:.0f}"), ("wall_s", "{:.0f}")]
HEADERS = ["case", "mix", "strategy", "quant", "mb", "ckpt", "liger", "fp8", "clock", "s/step", "pairs|seqs/s/GPU",
           "real tokens/s/GPU", "padding", "MFU (bf16 rate)", "MFU (FP8 rate)", "peak GiB/GPU", "plan GiB",
           "train acc|loss", "eval acc|loss", "load s", "host GiB", "resumed", "to step 1 s", "after last step s",
           "wall s"]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in results:
        cells = []
        for key, fmt in COLUMNS:
            value = r.get(key)
            cells.append("-" if value is None else fmt.format(value) if not isinstance(value, bool)
                         else ("on" if value else "off"))
        if "not_run" in r:
            cells[-1] += f" (not run: {r['not_run']})"
        if "stopped_at_s" in r:
            cells[-1] += f" (stopped at its {r['stopped_at_s']} s limit)"
        if "error" in r:
            cells[-1] += f" (failed: {r['error'][:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
