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
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from launcher import ROOT, memory

WARMUP_STEPS = 5
PEAK_BF16_FLOPS = 790e12  # dense bf16 matrix rate measured on the lent H100/H200s (an 8192^3 product)
TIMEOUT_S = 300


@dataclass(frozen=True)
class Case:
    kind: str  # launcher | peer (../shared/peer/dpo_trl.py) | peer_sft (bench/peer_sft_trl.py)
    method: str = "dpo"
    overrides: tuple[str, ...] = ()  # launcher cases: command-line overrides on top of the defaults
    env: dict = field(default_factory=dict)  # peer cases: the peer script's settings
    preset: str = "qwen2.5-1.5b-instruct"
    peer_config: str = "acc_ddp.yaml"
    mix: str = "uniform"  # the rows' lengths (launcher/bench_assets.py): uniform (the peer's job) or realistic


# data.max_length per mix: no uniform row is cut (the longest sequence is 351 tokens); 1.4% of the realistic ones are
MAX_LENGTH = {"uniform": 384, "realistic": 2048}


CASES = {
    "defaults": Case("launcher"),  # what a user gets without choosing anything (strategy=auto)
    # the same run timed by the peer's clock (train.step_clock): single steps, GPU synced at start and end
    "defaults-clocked": Case("launcher", overrides=("train.step_clock=true",)),
    "peer-ddp-bs32": Case("peer", env={"STRATEGY": "ddp", "BS": "32", "GC": "0"}),  # the peer, hand-tuned
    "peer-ddp-bs4": Case("peer", env={"STRATEGY": "ddp", "BS": "4", "GC": "1"}),  # the tutorials' defaults
    "ddp": Case("launcher", overrides=("strategy=ddp",)),
    "zero2": Case("launcher", overrides=("strategy=zero2",)),
    "zero3": Case("launcher", overrides=("strategy=zero3",)),
    "zero3_offload": Case("launcher", overrides=("strategy=zero3_offload",)),
    "ddp-4bit": Case("launcher", overrides=("strategy=ddp", "quant=4bit")),
    "fsdp_qlora-4bit": Case("launcher", overrides=("strategy=fsdp_qlora", "quant=4bit")),
    # levers, each measured against "ddp"
    "ddp-no-liger": Case("launcher", overrides=("strategy=ddp", "train.liger=false")),
    # twice the defaults' micro-batch; on an H200 it fits without checkpointing since the adapters take bf16 inputs
    "ddp-mb64": Case("launcher", overrides=("strategy=ddp", "micro_batch=64")),
    "ddp-mb4-ckpt": Case("launcher", overrides=("strategy=ddp", "micro_batch=4", "train.gradient_checkpointing=true",
                                                "train.liger=false")),  # the launcher at the old defaults
    # levers for the sharded strategies, which trail zero2 (docs/benchmarks.md)
    "zero3-per-module": Case("launcher", overrides=("strategy=zero3", "strategy.fetch_whole_layers=false")),
    "zero3-prefetch": Case("launcher", overrides=(  # four times the shipped prefetch bucket: 2e8 parameters
        "strategy=zero3", "+strategy.deepspeed.zero_optimization.stage3_prefetch_bucket_size=200000000")),
    "fsdp_qlora": Case("launcher", overrides=("strategy=fsdp_qlora",)),  # FSDP over bf16 weights: no dequantizing
    "fsdp_qlora-4bit-grad-op": Case("launcher", overrides=(  # weights stay gathered from forward to backward
        "strategy=fsdp_qlora", "quant=4bit", "+strategy.fsdp.fsdp_sharding_strategy=SHARD_GRAD_OP")),
    # each decoder layer one FSDP unit with its adapters inside, not PEFT's unit per LoRA matrix (392 here)
    "fsdp_qlora-layer-units": Case("launcher", overrides=(
        "strategy=fsdp_qlora", "strategy.adapters_in_layer_units=true")),
    "fsdp_qlora-4bit-layer-units": Case("launcher", overrides=(
        "strategy=fsdp_qlora", "quant=4bit", "strategy.adapters_in_layer_units=true")),
    "fsdp_qlora-4bit-prefetch": Case("launcher", overrides=(
        "strategy=fsdp_qlora", "quant=4bit", "+strategy.fsdp.fsdp_forward_prefetch=true")),
    # 64 pairs (49k tokens) without checkpointing, as micro_batch=auto gives zero3 and fsdp_qlora: +2% for zero2
    "zero2-mb64": Case("launcher", overrides=("strategy=zero2", "micro_batch=64", "train.gradient_checkpointing=false")),
    # PEFT's own LoRA forward: the scaling and the sum as passes of their own over each layer's output
    "zero2-unfused": Case("launcher", overrides=("strategy=zero2", "train.fuse_lora_sum=false")),
    "ddp-unfused": Case("launcher", overrides=("strategy=ddp", "train.fuse_lora_sum=false")),
    # the per-step host work as the libraries do it (launcher/host_work.py)
    "ddp-untrimmed": Case("launcher", overrides=("strategy=ddp", "train.trim_host_work=false")),
    # TRL's metrics gathered once per log, not at every step (launcher/step_metrics.py); measured on 2+ GPUs only
    "ddp-metrics-at-log": Case("launcher", overrides=("strategy=ddp", "train.metrics_sync=log")),
    "sft-metrics-at-log": Case("launcher", "sft", overrides=("train.metrics_sync=log",)),
    # batches collated by the rank between steps, not by the 2 worker processes of the defaults on GPUs
    "ddp-workers0": Case("launcher", overrides=("strategy=ddp", "train.dataloader_workers=0")),
    # a user's choice, not a default (it changes the training): what LoRA's dropout costs, a pass over each
    # adapter's input and a saved copy of it (the profiled defaults' generic elementwise kernels, dropout's
    # among them, took 28 of the step's 464 GPU ms)
    "ddp-no-dropout": Case("launcher", overrides=("strategy=ddp", "lora.dropout=0")),
    # SFT on the same model and rows (prompt + chosen answer)
    "sft-defaults": Case("launcher", "sft"),
    "sft": Case("launcher", "sft", overrides=("strategy=ddp",)),
    "peer-sft-bs4": Case("peer_sft", "sft", env={"BS": "4", "GC": "1"}),
    "peer-sft-bs32": Case("peer_sft", "sft", env={"BS": "32", "GC": "0"}),
    # the defaults as they were before padding-free batches (padded, 32 pairs per micro-batch)
    "defaults-padded": Case("launcher", overrides=("train.padding_free=false",)),
    # the realistic length mix (launcher/bench_assets.py): lengths from a few tokens to 5,000, data.max_length=2048.
    # The peer pads as TRL does, its batch the largest that fits a batch of rows at max_length without checkpointing
    # (DPO 8 pairs measured 107.2 GiB on an H200, 10 would take about 133; SFT 16 rows measured 123.5 GiB)
    "real-peer-bs10": Case("peer", env={"STRATEGY": "ddp", "BS": "10", "GC": "0", "MAXLEN": "2048"}, mix="realistic"),
    "real-peer-bs8": Case("peer", env={"STRATEGY": "ddp", "BS": "8", "GC": "0", "MAXLEN": "2048"}, mix="realistic"),
    "real-defaults": Case("launcher", mix="realistic"),  # padding-free, micro-batches filled to a token budget
    "real-padded": Case("launcher", overrides=("train.padding_free=false",), mix="realistic"),  # grouped by length
    "real-padded-random": Case("launcher", overrides=("train.padding_free=false", "train.group_by_length=false"),
                               mix="realistic"),
    "real-rows": Case("launcher", overrides=("micro_batch_tokens=null",), mix="realistic"),  # padding-free, 8 pairs
    "real-peer-sft-bs16": Case("peer_sft", "sft", env={"BS": "16", "GC": "0", "MAXLEN": "2048"}, mix="realistic"),
    "real-sft-defaults": Case("launcher", "sft", mix="realistic"),  # packed rows (padding-free)
    "real-sft-padded": Case("launcher", "sft", overrides=("method.packing=false",), mix="realistic"),
    "real-sft-metrics-at-log": Case("launcher", "sft", overrides=("train.metrics_sync=log",), mix="realistic"),
    "defaults-padded-metrics-at-log": Case("launcher", overrides=("train.padding_free=false", "train.metrics_sync=log")),
    # Qwen2.5-7B's shape, QLoRA, on two GPUs
    "7b-fsdp_qlora-4bit": Case("launcher", overrides=("strategy=fsdp_qlora", "quant=4bit"), preset="qwen2.5-7b-instruct"),
    "7b-zero3-4bit": Case("launcher", overrides=("strategy=zero3", "quant=4bit"), preset="qwen2.5-7b-instruct"),
}
DEFAULT_CASES = ("peer-ddp-bs32", "defaults", "ddp", "zero2", "zero3", "ddp-4bit", "fsdp_qlora-4bit", "zero3_offload")


def flops_per_token(n_params: float, method: str, lora: bool, precomputed_ref: bool) -> float:
    """Model FLOPs per token of one training step (recomputation by checkpointing not counted, as MFU goes):
    forward 2N, backward 2N for the input gradients (+2N for weight gradients without LoRA), and for DPO
    the reference forward 2N unless its log-probs were precomputed."""
    flops = 2 * n_params + (2 if lora else 4) * n_params
    if method == "dpo" and not precomputed_ref:
        flops += 2 * n_params
    return flops


def launcher_argv(name: str, case: Case, assets: Path, out: Path, gpus: int, steps: int,
                  profile_steps: str | None = None) -> list[str]:
    data = (["data=demo_sft", f"data.path={assets}/sft.jsonl"] if case.method == "sft"
            else [f"data.path={assets}/pref.jsonl"])
    return [sys.executable, "-m", "launcher", f"model={case.preset}", f"model.path={assets}/model",
            f"model.tokenizer={assets}/tokenizer", f"method={case.method}", *data,
            f"data.max_length={MAX_LENGTH[case.mix]}",
            "data.conversational=false",  # the peer's rows are plain strings: no chat template, the same tokens
            f"gpus={gpus}" if gpus else "cpu_procs=2", f"train.max_steps={steps}", "save_steps=100000",
            f"run_dir={out}/runs/{name}", "overwrite=true", *case.overrides,
            *([f"train.profile_steps=[{profile_steps}]"] if profile_steps else [])]


def peer_argv(case: Case, peer: Path, gpus: int, port: int) -> list[str]:
    script = peer / "dpo_trl.py" if case.kind == "peer" else ROOT / "bench" / "peer_sft_trl.py"
    return ["accelerate", "launch", "--config_file", str(peer / case.peer_config), "--num_processes", str(gpus),
            "--main_process_port", str(port), str(script)]


def read_launcher_run(run: Path, case: Case, n_params: float, tokens_per_row: float | None = None) -> dict:
    """The run's row of the table. `tokens_per_row`: the data's mean real tokens per pair (or SFT row), which
    turns tokens/s into pairs/s where micro-batches hold varying numbers of rows."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    first, last = cfg["train"].get("profile_steps") or (0, -1)
    steady, before = [], 0
    for r in (r for r in rows if "step_seconds" in r):  # each row: the mean over the steps since the previous log
        if before >= WARMUP_STEPS and not (before < last and r["step"] >= first):  # past warm-up, none profiled
            steady.append(r)
        before = r["step"]
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
               checkpointing=plan["gradient_checkpointing"], liger=plan["liger"], strategy=plan["strategy"],
               quant=cfg["quant"]["name"], step_s=step_s, per_s_per_gpu=per_s, tokens_per_s_per_gpu=tokens,
               padding=statistics.median(shares) if shares else None,
               plan_gib=float(planned[0].split()[2]) if planned else None,
               mfu=tokens * flops_per_token(n_params, case.method, cfg["lora"]["r"] is not None, precomputed)
               / PEAK_BF16_FLOPS,
               peak_gib=max(r.get("peak_gpu_mem_gib", 0) for r in rows))
    accs = [r["rewards/accuracies"] for r in rows if "rewards/accuracies" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    res["train_metric"] = statistics.mean(accs[-5:]) if accs else statistics.mean(losses[-5:])
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        res["eval_metric"] = s.get("eval_rewards/accuracies", s.get("eval_loss"))
    return res


def sequence_lengths(assets: Path, method: str, max_length: int) -> list[list[int]]:
    """Per row, the sequences TRL builds from it, as it tokenizes plain-string rows: the prompt, then the answer
    and its EOS, cut at max_length (DPO: chosen and rejected; SFT: prompt and completion)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "tokenizer")

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = []
    with open(assets / ("pref.jsonl" if method == "dpo" else "sft.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            answers = [r["chosen"], r["rejected"]] if method == "dpo" else [r["completion"]]
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


def run_case(name: str, case: Case, args) -> dict:
    from launcher.machine import find_free_port

    if args.preset:
        case = replace(case, preset=args.preset)
    assets = Path(args.assets) / (case.preset if case.mix == "uniform" else f"{case.preset}-{case.mix}")
    if not (assets / "DONE").exists():  # in a child process, so that no GPU memory stays held here
        subprocess.run([sys.executable, "-m", "launcher.bench_assets", str(assets), case.preset, case.mix], check=True)
    shape = yaml.safe_load((ROOT / "conf" / "model" / f"{case.preset}.yaml").read_text())["shape"]
    n_params = memory.Shape.from_config(shape).total_params()
    out = Path(args.out)
    if case.kind == "launcher":
        argv, env = launcher_argv(name, case, assets, out, args.gpus, args.steps, args.profile_steps), dict(os.environ)
    else:
        argv = peer_argv(case, Path(args.peer), args.gpus, find_free_port())
        env = dict(os.environ, ASSETS=str(assets), STEPS=str(args.steps), **case.env)
    rows = sequence_lengths(assets, case.method, MAX_LENGTH[case.mix])
    started = time.time()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, env=env)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text, code = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {args.timeout} s", -1
    (out / f"{name}.log").write_text(text if isinstance(text, str) else text.decode(errors="replace"))
    res = dict(case=name, method=case.method, preset=case.preset, mix=case.mix, wall_s=round(time.time() - started, 1),
               rc=code)
    try:
        if case.kind == "launcher":
            res.update(read_launcher_run(out / "runs" / name, case, n_params, statistics.mean(map(sum, rows))))
        else:
            res.update(read_peer_output(text, case, rows, n_params))
    except Exception as exc:  # a failed case is a row that says so; the others still run
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return res


COLUMNS = [("case", "{}"), ("mix", "{}"), ("strategy", "{}"), ("quant", "{}"), ("micro_batch", "{}"),
           ("checkpointing", "{}"), ("liger", "{}"), ("clock", "{}"), ("step_s", "{:.3f}"), ("per_s_per_gpu", "{:.1f}"),
           ("tokens_per_s_per_gpu", "{:.0f}"), ("padding", "{:.0%}"), ("mfu", "{:.1%}"), ("peak_gib", "{:.1f}"),
           ("plan_gib", "{:.1f}"), ("train_metric", "{:.3f}"), ("eval_metric", "{:.3f}"), ("wall_s", "{:.0f}")]
HEADERS = ["case", "mix", "strategy", "quant", "mb", "ckpt", "liger", "clock", "s/step", "pairs|seqs/s/GPU",
           "real tokens/s/GPU", "padding", "MFU", "peak GiB/GPU", "plan GiB", "train acc|loss", "eval acc|loss",
           "wall s"]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in results:
        cells = []
        for key, fmt in COLUMNS:
            value = r.get(key)
            cells.append("-" if value is None else fmt.format(value) if not isinstance(value, bool)
                         else ("on" if value else "off"))
        if "error" in r:
            cells[-1] += f" (failed: {r['error'][:80]})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    p.add_argument("--profile-steps", help="A,B: profile steps A..B of each launcher case (runs/<case>/profile.txt); "
                                           "the median leaves them out")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
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
