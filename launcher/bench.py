"""The benchmark: the same job per strategy through `python -m launcher`, beside the plain-TRL peer, in one
table (seconds/step, pairs or tokens/s per GPU, MFU, peak GiB per GPU, reward accuracy).

    python -m launcher.bench --peer peer/ --gpus 2 --out bench-out            # the DPO matrix
    python -m launcher.bench --peer peer/ --cases sft,peer-sft-bs4 --out ...  # any subset (or --cases all)

The job is the peer's (../shared/peer/RESULTS.md): a random-init model of a preset's shape, LoRA r16 on all
linear layers, 2000 synthetic preference pairs of ~700 tokens (launcher/bench_assets.py builds them once
under --assets); the `real-*` cases run 4000 rows of a realistic length mix instead (data.max_length=2048).
Tokens per second and MFU count real tokens only (the peer's DPO: its pairs/s times the data's mean real tokens
per pair); the padding column is the share of the positions the model ran that were padding (logged by the
launcher; for the peer, the expectation over random batches padded as TRL pads them). Every launcher case runs with the launcher's defaults plus the case's own overrides; the
peer runs its own script with its stock accelerate config. Both log every 5 steps (their defaults): the
peer's time is the median over single steps after WARMUP_STEPS, a launcher case's the median over the logged
intervals after them (wall clock between two logs / 5 steps), which counts the batch fetch and the logging the
peer's clock leaves out. A case with train.step_clock=true (defaults-clocked) is timed by the peer's clock; the
table's clock column says which a row used. Results: <out>/bench.json and <out>/bench.md.
scripts/gpu_bench.sh runs it on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from launcher import ROOT, memory
from launcher.methods import METHODS
from launcher.bench_cases import CASES, DEFAULT_CASES, MAX_LENGTH, Case  # noqa: F401  (the bench's API)
from launcher.bench_table import table
from launcher.resources import shipped
from launcher.report import read_metrics  # (matplotlib only when a report is drawn)

WARMUP_STEPS = 5
PEAK_BF16_FLOPS = 790e12  # dense bf16 matrix rate measured on the lent H100/H200s (an 8192^3 product)
# dense FP8 rate (e4m3, a scale per row, an 8192^3 product): 1342 and 1422 TFLOP/s in two calls on an H200 on
# 2026-12-01 (scripts/fp8_linear_bench.py; bf16 measured 755 and 780 in the same calls)
PEAK_FP8_FLOPS = 1380e12
TIMEOUT_S = 300
MIN_CASE_S = 30  # a case given less than this would not reach its first step


def flops_per_token(n_params: float, method: str, lora: bool, precomputed_ref: bool) -> float:
    """Model FLOPs per token of one training step (recomputation by checkpointing not counted, as MFU goes):
    forward 2N, backward 2N for the input gradients (+2N for weight gradients without LoRA), and for DPO
    the reference forward 2N unless its log-probs were precomputed; KTO's KL pass adds a forward of the policy and
    one of the reference (its KL rows are as long as the rows counted). ORPO and SimPO have no reference."""
    flops = 2 * n_params + (2 if lora else 4) * n_params
    if METHODS[method].reference and not precomputed_ref:
        flops += 2 * n_params
    if method == "kto":
        flops += (2 if precomputed_ref else 4) * n_params
    return flops


def launcher_argv(name: str, case: Case, assets: Path, out: Path, gpus: int, steps: int,
                  profile_steps: str | None = None) -> list[str]:
    data = (["data=demo_sft", f"data.path={assets}/sft.jsonl"] if case.method == "sft"
            else [f"data.path={assets}/pref.jsonl"])
    return [sys.executable, "-m", "launcher", f"model={case.preset}", f"model.path={assets}/model",
            f"model.tokenizer={assets}/tokenizer", f"method={case.method}", *data,
            f"data.max_length={MAX_LENGTH[case.mix]}",
            "data.conversational=false",  # the peer's rows are plain strings: no chat template, the same tokens
            f"gpus={gpus}" if gpus else "cpu_procs=2", f"train.max_steps={steps}",
            # a case that resumes saves at its last step; the others never
            f"save_steps={steps if case.resume_to else 100000}",
            f"run_dir={out}/runs/{name}", "overwrite=true", *case.overrides,
            *([f"train.profile_steps=[{profile_steps}]"] if profile_steps else [])]


def peer_argv(case: Case, peer: Path, gpus: int, port: int) -> list[str]:
    script = peer / "dpo_trl.py" if case.kind == "peer" else ROOT / "bench" / "peer_sft_trl.py"
    return ["accelerate", "launch", "--config_file", str(peer / case.peer_config), "--num_processes", str(gpus),
            "--main_process_port", str(port), str(script)]


def read_launcher_run(run: Path, case: Case, n_params: float, tokens_per_row: float | None = None) -> dict:
    """The run's row of the table. `tokens_per_row`: the data's mean real tokens per pair (or SFT row), which
    turns tokens/s into pairs/s where micro-batches hold varying numbers of rows."""
    if not (run / "config.yaml").is_file():
        raise ValueError("the run stopped before it wrote its config.yaml")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = read_metrics(run) if (run / "metrics.jsonl").is_file() else []
    first, last = cfg["train"].get("profile_steps") or (0, -1)
    steady, before = [], 0
    for r in (r for r in rows if "step_seconds" in r):  # each row: the mean over the steps since the previous log
        if before >= WARMUP_STEPS and not (before < last and r["step"] >= first):  # past warm-up, none profiled
            steady.append(r)
        before = r["step"]
    if not steady:
        raise ValueError(f"no step timed: none was logged after the {WARMUP_STEPS} warm-up steps")
    step_s = statistics.median(r["step_seconds"] for r in steady)
    tokens = statistics.median(r["tokens_per_sec_per_gpu"] for r in steady)
    clock = "between logs"
    if (run / "step_clock.txt").exists():  # train.step_clock: single steps timed as the peer times them
        steps = [line.split() for line in (run / "step_clock.txt").read_text().splitlines() if line.strip()]
        timed = [float(t) for n, t in steps if int(n) > WARMUP_STEPS and not first <= int(n) <= last]
        tokens *= step_s / statistics.median(timed)  # the same tokens per step, over the clocked step time
        step_s, clock = statistics.median(timed), "per step, synced"
    plan = cfg["plan"]
    varying = plan.get("token_budget") or plan.get("packing")
    rows_per_step = cfg["micro_batch"] * cfg["train"]["grad_accum"]
    per_s = tokens / tokens_per_row if varying and tokens_per_row else rows_per_step / step_s
    precomputed = bool(cfg["method"].get("precompute_ref_log_probs"))
    shares = [r["padding_share"] for r in steady if "padding_share" in r]
    planned = [d for d in plan.get("decisions", []) if d.startswith("memory plan: ")]
    res = dict(clock=clock, micro_batch=f"{plan['token_budget']} tok" if plan.get("token_budget") else cfg["micro_batch"],
               checkpointing=plan["gradient_checkpointing"], liger=plan["liger"],
               fp8=plan.get("fp8", False) and ("on" if plan["fp8_forward"] else "backward"),
               strategy=plan["strategy"],
               quant=cfg["quant"]["name"], step_s=step_s, per_s_per_gpu=per_s, tokens_per_s_per_gpu=tokens,
               padding=statistics.median(shares) if shares else None,
               plan_gib=float(planned[0].split()[2]) if planned else None,
               mfu=tokens * flops_per_token(n_params, case.method, cfg["lora"]["r"] is not None, precomputed)
               / PEAK_BF16_FLOPS,
               peak_gib=max(r.get("peak_gpu_mem_gib", 0) for r in rows))
    if res["fp8"] == "on":  # against the FP8 rate: a floor, as attention, adapters, LM head and loss run in bf16
        res["mfu_fp8"] = res["mfu"] * PEAK_BF16_FLOPS / PEAK_FP8_FLOPS
    accs = [r["rewards/accuracies"] for r in rows if "rewards/accuracies" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    res["train_metric"] = statistics.mean(accs[-5:]) if accs else statistics.mean(losses[-5:])
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        res["eval_metric"] = s.get("eval_rewards/accuracies", s.get("eval_loss"))
        if case.method == "kto" and "eval_rewards/chosen" in s:  # the held-out reward gap
            res["eval_metric"] = s["eval_rewards/chosen"] - s.get("eval_rewards/rejected", 0.0)
        res["load_s"] = s.get("load_seconds")
    return res


def sequence_lengths(assets: Path, method: str, max_length: int) -> list[list[int]]:
    """Per row, the sequences TRL builds from it, as it tokenizes plain-string rows: the prompt, then the answer
    and its EOS, cut at max_length (DPO: chosen and rejected; SFT: prompt and completion)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = []
    pairs = METHODS[method].rows != "sft"  # KTO's rows come from the same pairs
    with open(assets / ("pref.jsonl" if pairs else "sft.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            answers = [r["chosen"], r["rejected"]] if pairs else [r["completion"]]
            rows.append([min(n(r["prompt"]) + n(a) + 1, max_length) for a in answers])
    return rows


def padded_share(rows: list[list[int]], batch: int, draws: int = 2000) -> float:
    """The share of padding in random batches of `batch` rows padded as TRL pads them: every sequence of the batch
    (DPO: both of each pair) to the batch's longest."""
    import random

    rng, real, padded = random.Random(0), 0, 0
    for _ in range(draws):
        seqs = [s for _ in range(batch) for s in rows[rng.randrange(len(rows))]]
        real, padded = real + sum(seqs), padded + len(seqs) * max(seqs)
    return 1 - real / padded


def read_peer_output(text: str, case: Case, rows: list[list[int]], n_params: float) -> dict:
    """The peer's row: its own pairs/s (DPO) or real tokens/s (SFT, counted by the Trainer without padding);
    DPO's real tokens/s are its pairs/s times the data's mean real tokens per pair."""
    line = next(l for l in text.splitlines() if l.startswith("RESULT rank 0 "))
    r = json.loads(line.removeprefix("RESULT rank 0 "))
    step_s = r["median_step_s"]
    if case.method == "dpo":
        tokens = r["pairs_per_s_per_gpu"] * statistics.mean(sum(row) for row in rows)
        metric = (r["last_log"] or [{}])[0].get("rewards/accuracies")
    else:
        tokens = r["tokens_per_s_per_gpu"]
        metric = (r["last_log"] or [{}])[0].get("loss")
    return dict(clock="per step, synced", micro_batch=r["bs"], checkpointing=case.env.get("GC") == "1", liger=False,
                strategy=case.env.get("STRATEGY", "ddp"), quant=case.env.get("QUANT", "none"), step_s=step_s,
                per_s_per_gpu=r["bs"] / step_s, tokens_per_s_per_gpu=tokens, padding=padded_share(rows, r["bs"]),
                mfu=tokens * flops_per_token(n_params, case.method, True, False) / PEAK_BF16_FLOPS,
                peak_gib=r["peak_alloc_gib"], train_metric=metric)


def case_timeout(per_case: int, deadline: float | None, now: float) -> int | None:
    """Seconds a case may run: its own limit, cut to what is left of the bench's --budget-s, so that a case the
    budget ends is stopped by the bench, which still reads its logged steps; None where too little is left for a
    case to reach its first step."""
    left = per_case if deadline is None else min(per_case, int(deadline - now))
    return left if left >= MIN_CASE_S else None


def run_case(name: str, case: Case, args) -> dict:
    from launcher.machine import find_free_port

    if args.preset:
        case = replace(case, preset=args.preset)
    assets = Path(args.assets) / "-".join([case.preset] + [x for x in (case.mix, case.weights)
                                                           if x not in ("uniform", "bf16")])
    if case_timeout(args.timeout, args.deadline, time.monotonic()) is None:
        return dict(case=name, method=case.method, preset=case.preset, mix=case.mix,
                    not_run=f"less than {MIN_CASE_S} s of its time (--timeout, --budget-s) was left")
    if not (assets / "DONE").exists():  # in a child process, so that no GPU memory stays held here
        left = None if args.deadline is None else max(1, int(args.deadline - time.monotonic()))
        try:
            subprocess.run([sys.executable, "-m", "launcher.bench_assets", str(assets), case.preset, case.mix, "-",
                            case.weights], check=True, timeout=left)
        except subprocess.TimeoutExpired:
            return dict(case=name, method=case.method, preset=case.preset, mix=case.mix,
                        not_run="--budget-s was spent while its model and data were built")
    shape = yaml.safe_load((shipped("conf") / "model" / f"{case.preset}.yaml").read_text())["shape"]
    n_params = memory.Shape.from_config(shape).total_params()
    out = Path(args.out)
    if case.kind == "launcher":
        argv, env = launcher_argv(name, case, assets, out, args.gpus, args.steps, args.profile_steps), dict(os.environ)
    else:
        argv = peer_argv(case, Path(args.peer), args.gpus, find_free_port())
        env = dict(os.environ, ASSETS=str(assets), STEPS=str(args.steps), **case.env)
    rows = sequence_lengths(assets, case.method, MAX_LENGTH[case.mix])
    timeout = case_timeout(args.timeout, args.deadline, time.monotonic())
    if timeout is None:  # the assets took the rest
        return dict(case=name, method=case.method, preset=case.preset, mix=case.mix,
                    not_run=f"less than {MIN_CASE_S} s of its time (--timeout, --budget-s) was left")
    started = time.time()
    with HostMemory() as host:
        text, code, lines = run_logged(argv, env, timeout, out / f"{name}.log")
    res = dict(case=name, method=case.method, preset=case.preset, mix=case.mix, wall_s=round(time.time() - started, 1),
               rc=code, host_gib=host.peak_gib, **start_and_exit_seconds(lines, args.steps))
    if code == -1:  # its steps are still read from its metrics; what came after them may be missing
        res["stopped_at_s"] = timeout
    try:
        if case.kind == "launcher":
            res.update(read_launcher_run(out / "runs" / name, case, n_params, statistics.mean(map(sum, rows))))
        else:
            res.update(read_peer_output(text, case, rows, n_params))
    except Exception as exc:  # a failed case is a row that says so; the others still run
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    timeout = case_timeout(args.timeout, args.deadline, time.monotonic())
    if case.resume_to and code == 0:  # after the row is read: the resumed steps land in the same run directory
        resumed = [a for a in argv if a != "overwrite=true" and not a.startswith("train.max_steps=")]
        resumed += [f"train.max_steps={case.resume_to}", "resume=auto"]
        again = run_logged(resumed, env, timeout, out / f"{name}-resumed.log")[0] if timeout else ""
        res["resumed"] = (resume_result(out / "runs" / name, again, args.steps, case.resume_to) if timeout else
                          "not run: --budget-s spent")
    return res


def run_logged(argv: list[str], env: dict, timeout: int, log: Path) -> tuple[str, int, list[tuple[float, str]]]:
    """Runs a case to its end or its timeout; a case past its timeout is stopped with all of its processes (the
    launcher passes a second SIGTERM on to its ranks at once), so that the next case has the GPUs to itself.
    Also each output line with its second since the command started (tqdm's updates count as lines)."""
    import threading

    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env, start_new_session=True)  # text mode: a carriage return ends a line too
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for _ in range(2):
            proc.send_signal(signal.SIGTERM)
            time.sleep(1)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        code = -1
    exited = time.monotonic() - started
    reader.join(timeout=10)  # the rest of the output (a process the command left behind may hold the pipe open)
    lines = [*lines, (exited, "")]  # a copy, ending at the command's exit
    text = "".join(line for _, line in lines) + (f"\nTIMEOUT after {timeout} s" if code == -1 else "")
    log.write_text(text)
    return text, code, lines


def start_and_exit_seconds(lines: list[tuple[float, str]], steps: int) -> dict:
    """Seconds from the command to the end of its first training step, and from the end of its last step to its
    exit, by the progress the command prints: the launcher's `step 1/N` lines, the peer's tqdm `1/N [` bar."""
    first = re.compile(rf"(^step 1/{steps}\b|\b1/{steps} \[)")
    last = re.compile(rf"(^step {steps}/{steps}\b|\b{steps}/{steps} \[)")
    at_first = next((t for t, line in lines if first.search(line)), None)
    at_last = next((t for t, line in reversed(lines) if last.search(line)), None)
    ended = lines[-1][0]
    return dict(to_first_step_s=round(at_first, 1) if at_first is not None else None,
                after_last_step_s=round(ended - at_last, 1) if at_last is not None else None)


def resume_result(run: Path, text: str, saved_at: int, wanted: int) -> str:
    """'20->25': the resumed run started from the checkpoint of step `saved_at` (the launcher's resume line) and
    ended at `wanted`."""
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    came_from = f"checkpoint-{saved_at} (step {saved_at})" in text
    ended = summary.get("global_step")
    return f"{saved_at}->{ended}" if came_from and ended == wanted else f"FAILED ({saved_at}->{ended})"


class HostMemory:
    """The host's memory in use (MemTotal - MemAvailable: processes and pinned memory, not the page cache),
    sampled twice a second while a case runs; peak_gib: its highest value above what was in use before."""

    def __enter__(self):
        import threading

        self.base, self.peak, self.stop = self.used(), 0.0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.wait(0.5):
            self.peak = max(self.peak, self.used() - self.base)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_gib = round(self.peak / 2**30, 1)

    @staticmethod
    def used() -> float:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return (int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])) * 1024


def environment() -> str:
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines() if shutil.which("nvidia-smi") else []
    versions = subprocess.run([sys.executable, "-c", "import torch, transformers, trl, peft, accelerate, deepspeed; "
                               "print(' '.join(f'{m.__name__} {m.__version__}' for m in (torch, transformers, trl, "
                               "peft, accelerate, deepspeed)))"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    where = f"{len(gpus)}x {gpus[0]}" if gpus else f"CPU only ({os.cpu_count()} cores)"
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {where}; {' '.join(versions)}"


def case_names(text: str) -> list[str]:
    return list(CASES) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"all, or comma-separated from: {', '.join(CASES)}")
    p.add_argument("--peer", default="peer", help="folder of the plain-TRL peer (../shared/peer)")
    p.add_argument("--assets", default="/tmp/launcher-bench-assets", help="built once per preset, then reused")
    p.add_argument("--gpus", type=int, default=2, help="0: CPU processes (a smoke run of the benchmark itself)")
    p.add_argument("--preset", help="one model preset for every case instead of each case's own (e.g. tiny)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help="seconds per case")
    p.add_argument("--budget-s", type=int, help="seconds for all cases: a case still running when they are spent is "
                                                "stopped, and its logged steps make its row; later cases do not run")
    p.add_argument("--profile-steps", help="A,B: profile steps A..B of each launcher case (runs/<case>/profile.txt); "
                                           "the median leaves them out")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    args.deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    names = case_names(args.cases)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.error(f"--cases: unknown case(s) {', '.join(unknown)}; choose all or from {', '.join(CASES)}")
    if any(CASES[n].kind != "launcher" for n in names) and not (Path(args.peer) / "dpo_trl.py").exists():
        p.error(f"--peer {args.peer}: no dpo_trl.py there (copy ../shared/peer into the project, e.g. peer/)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = environment()
    results = []
    for name in names:
        results.append(run_case(name, CASES[name], args))
        (out / "bench.json").write_text(json.dumps({"environment": header, "results": results}, indent=2) + "\n")
        (out / "bench.md").write_text(f"{header}\n\n{table(results)}\n")
        print(f"[bench] {name}: " + json.dumps(results[-1]), flush=True)
    print(f"{header}\n\n{table(results)}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
