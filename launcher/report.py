"""<run_dir>/report.html: one self-contained page per run (curves, plan and decisions, summary, sample answers).

    python -m launcher report <run_dir>        # any run: finished, failed, stopped or still running

The launcher writes it after every run; this command writes it again at any time. The plots are matplotlib
figures (Agg backend) embedded as base64 PNGs: matplotlib is the long-maintained standard plotting library, it
needs no display and no JavaScript, so the page opens offline in any browser, mail client or CI artifact viewer,
and a dozen small PNGs keep the file at a few hundred kB (an interactive plotly page carries ~3.5 MB of JS).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
from pathlib import Path

REPORT_FILE = "report.html"
PREFERENCE = ("dpo", "kto", "orpo", "simpo")
# (title, metrics drawn in it, methods it is for: None for all). Held-out values (eval_*) join their training curve as markers.
PANELS = [
    ("loss", ["loss", "eval_loss"], None),
    ("rewards (KTO: desirable as chosen)", ["rewards/chosen", "rewards/rejected", "rewards/margins",
                                            "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"],
     PREFERENCE),
    ("reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"], ("dpo", "orpo", "simpo")),
    ("KL estimate", ["kl", "eval_kl"], ("kto",)),
    ("ORPO's terms", ["nll_loss", "log_odds_ratio", "eval_nll_loss", "eval_log_odds_ratio"], ("orpo",)),
    ("log-probabilities", ["logps/chosen", "logps/rejected", "eval_logps/chosen", "eval_logps/rejected"],
     PREFERENCE),
    ("token accuracy", ["mean_token_accuracy", "eval_mean_token_accuracy"], ("sft",)),
    ("tokens/s per GPU (real tokens)", ["tokens_per_sec_per_gpu"], None),
    ("peak GPU memory (GiB)", ["peak_gpu_mem_gib"], None),
    ("learning rate", ["learning_rate"], None),
    ("gradient norm", ["grad_norm"], None),
]
SUMMARY_KEYS = ("global_step", "train_loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
                "eval_rewards/chosen", "eval_rewards/rejected",
                "eval_mean_token_accuracy", "seconds", "load_seconds", "host_private_gib")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; a line that does not parse (the last one, while rank 0 is writing it) is left out."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_state(run_dir: Path, exit_code: int | None = None) -> tuple[str, str]:
    """(finished | stopped | failed | running, what to say about it); exit_code: the launch's, where known."""
    from launcher.checkpoints import STOPPED_FILE
    from launcher.postmortem import FAILED, FINISHED, STOPPED, _this_launch, explain_failure

    if (run_dir / "summary.json").exists():
        return "finished", ""
    if (run_dir / STOPPED_FILE).exists():
        step = (run_dir / STOPPED_FILE).read_text().strip()
        return "stopped", f"stopped on request at step {step}; `resume=auto` continues from its checkpoint"
    logs = list((run_dir / "logs").glob("rank*.log"))
    texts = ["\n".join(_this_launch(p)) for p in logs]  # an earlier launch's failure is not this one's
    if exit_code or any(FAILED in t or STOPPED in t for t in texts) or (logs and all(FINISHED in t for t in texts)):
        return "failed", "the run did not finish (no summary.json):\n" + explain_failure(str(run_dir))
    return "running", ("no summary.json yet: the run is still going, or was killed without a word "
                       "(then the rank logs end mid-run)")


def plot_panels(rows: list[dict], method: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """([(title, base64 PNG)], titles with nothing logged)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also where a GUI backend is installed
    import matplotlib.pyplot as plt

    images, empty = [], []
    for title, keys, for_method in PANELS:
        if for_method and method and method not in for_method:
            continue
        # by step, the later row winning: a resumed run logs again the steps after its checkpoint
        series = {k: sorted({r["step"]: r[k] for r in rows if isinstance(r.get(k), (int, float)) and "step" in r}
                            .items()) for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            empty.append(title)
            continue
        fig, ax = plt.subplots(figsize=(5.6, 3.1), dpi=90)
        colours = {}  # a held-out metric in its training curve's colour
        for key, points in series.items():
            steps, values = zip(*points)
            held_out = key.startswith("eval_")
            name = key.removeprefix("eval_")
            colour = colours.setdefault(name, f"C{len(colours)}")
            ax.plot(steps, values, label=("held-out " + name) if held_out else key, color=colour,
                    marker="o" if held_out or len(points) == 1 else None, linestyle="--" if held_out else "-")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        images.append((title, base64.b64encode(buf.getvalue()).decode()))
    return images, empty


def _table(pairs) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in pairs)
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _samples_html(samples: dict | None, run_dir: Path) -> str:
    if samples is None:
        return (f"<p>No sample answers (samples.json is written at the end of training). "
                f"<code>python -m launcher generate {html.escape(str(run_dir))} --base \"your prompt\"</code> "
                "answers any prompt.</p>")
    parts = [f"<p>{html.escape(samples['note'])}</p>" if samples.get("note") else "",
             f"<p>Greedy, at most {samples.get('max_new_tokens')} new tokens, with the chat template. "
             f"Base: {html.escape(samples.get('base') or 'none')}.</p>"]
    for i, sample in enumerate(samples.get("samples", []), 1):
        prompt = sample["prompt"] if isinstance(sample["prompt"], str) else "\n".join(
            f"[{m['role']}] {m['content']}" for m in sample["prompt"])
        columns = [("base model", sample.get("base")), ("tuned model", sample.get("tuned"))]
        if sample.get("reference") is not None:
            columns.append(("the data's answer", sample["reference"]))
        answers = "".join(f"<div><h4>{name}</h4><pre>{html.escape(text if text is not None else '(none)')}</pre>"
                          "</div>" for name, text in columns)
        parts.append(f"<div class=sample><h3>prompt {i}</h3><pre>{html.escape(prompt)}</pre>"
                     f"<div class=answers>{answers}</div></div>")
    return "".join(parts)


STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1180px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.state{padding:8px 12px;border-radius:4px;white-space:pre-wrap;font-family:monospace;font-size:12px}
.finished{background:#e6f4ea}.failed{background:#fce8e6}.running,.stopped{background:#fef7e0}
.plots{display:grid;grid-template-columns:repeat(2,1fr);gap:8px}.plots img{width:100%}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;font-size:12px;margin:4px 0}
.answers{display:grid;grid-template-columns:repeat(3,1fr);gap:8px}h3,h4{font-size:13px;margin:8px 0 2px}"""


def render(run_dir: Path, exit_code: int | None = None) -> str:
    import yaml

    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_path.exists() and not metrics_path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml and no metrics.jsonl: not a launcher run directory "
                                "(or its ranks never started)")
    cfg = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
    plan = cfg.get("plan") or _json(run_dir / "plan.json") or {}
    method = (cfg.get("method") or {}).get("name")
    rows = read_metrics(run_dir) if metrics_path.exists() else []
    summary = _json(run_dir / "summary.json")
    state, state_text = run_state(run_dir, exit_code)
    last_step = max((r.get("step", 0) for r in rows), default=0)
    images, empty = plot_panels(rows, method)
    facts = [("method", method), ("model", plan.get("model_path") or (cfg.get("model") or {}).get("path")),
             ("strategy", plan.get("strategy")), ("backend", plan.get("backend")),
             ("world size", plan.get("world_size")), ("device / dtype", f"{plan.get('device')} / {plan.get('dtype')}"),
             ("quant", (cfg.get("quant") or {}).get("name")), ("LoRA r", (cfg.get("lora") or {}).get("r")),
             ("micro batch", cfg.get("micro_batch")), ("max steps", (cfg.get("train") or {}).get("max_steps")),
             ("last logged step", last_step)]
    body = [f"<h1>{html.escape(str(cfg.get('run_name') or run_dir.name))}</h1>",
            f"<p>{html.escape(str(run_dir.resolve()))}</p>",
            f"<div class='state {state}'>{html.escape(state + (': ' + state_text if state_text else ''))}</div>",
            "<h2>Curves</h2><div class=plots>"
            + "".join(f"<img alt='{html.escape(t)}' src='data:image/png;base64,{b}'>" for t, b in images) + "</div>"
            + (f"<p>not logged in this run: {html.escape(', '.join(empty))}</p>" if empty else ""),
            "<h2>Summary</h2>" + (_table((k, summary[k]) for k in SUMMARY_KEYS if k in summary) if summary
                                   else "<p>no summary.json: the run has not finished.</p>"),
            "<h2>Sample answers</h2>" + _samples_html(_json(run_dir / "samples.json"), run_dir),
            "<h2>Plan</h2>" + _table((k, v) for k, v in facts if v is not None)
            + "<h3>decisions</h3><ul>" + "".join(f"<li>{html.escape(d)}</li>" for d in plan.get("decisions", []))
            + "</ul>"]
    title = html.escape(f"launcher report: {cfg.get('run_name') or run_dir.name}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def write_report(run_dir, exit_code: int | None = None) -> Path:
    """Write <run_dir>/report.html (whole or not at all: a reader never sees half a page); returns its path.
    exit_code: the launch's, from the launcher (a run killed without a word is then failed, not running)."""
    run_dir = Path(run_dir)
    page = render(run_dir, exit_code)
    path = run_dir / REPORT_FILE
    tmp = run_dir / f".{REPORT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m launcher report <run_dir>", file=sys.stderr)
        return 2
    try:
        path = write_report(argv[0])
    except FileNotFoundError as err:
        print(f"launcher: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
