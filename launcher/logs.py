"""Rank-aware logging: every rank writes <run_dir>/logs/rank<R>.log, only rank 0 talks to the console
and to trackers, and rank 0 appends every logged metric to <run_dir>/metrics.jsonl.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger("launcher")


def setup_logging(run_dir: str, rank: int) -> None:
    logs = Path(run_dir, "logs")
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    file_handler = logging.FileHandler(logs / f"rank{rank}.log")
    file_handler.setFormatter(fmt)
    file_handler.setLevel(logging.DEBUG)
    handlers: list[logging.Handler] = [file_handler]
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        console.setLevel(logging.INFO)
        handlers.append(console)
    for name in ("launcher", "transformers", "trl", "peft", "accelerate", "datasets"):
        lib = logging.getLogger(name)
        lib.handlers = list(handlers) if name == "launcher" else [file_handler]
        lib.setLevel(logging.DEBUG if name == "launcher" else logging.WARNING)
        lib.propagate = False
    if rank != 0:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def configure_trackers(logging_cfg: dict, run_name: str, run_dir: str) -> list[str]:
    """report_to for the Trainer. wandb goes online only with a key and a reachable server, else offline."""
    name = logging_cfg["name"]
    if name == "none":
        return []
    if name == "tensorboard":
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(Path(run_dir, "tensorboard")))
    if name == "wandb":
        mode = logging_cfg.get("mode", "auto")
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") and _reachable("api.wandb.ai", 443) else "offline"
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_PROJECT", logging_cfg.get("project") or "launcher")
        if logging_cfg.get("entity"):
            os.environ.setdefault("WANDB_ENTITY", logging_cfg["entity"])
        os.environ.setdefault("WANDB_NAME", run_name)
        os.environ.setdefault("WANDB_DIR", run_dir)  # offline runs land in the run directory (wandb sync later)
        log.info("wandb: %s mode", mode)
    return [name]


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


class MetricsCallback(TrainerCallback):
    """metrics.jsonl (rank 0); seconds per step, tokens/s per GPU and peak GPU memory added to every log."""

    def __init__(self, run_dir: str, world_size: int):
        self.path = Path(run_dir, "metrics.jsonl")
        self.world_size = world_size
        self.last = None  # (time, tokens seen, step)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), 0, state.global_step)  # TRL counts num_tokens from 0 in each process

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        now, tokens = time.perf_counter(), logs.get("num_tokens", 0)  # TRL's: non-padding tokens of all ranks
        if self.last and "loss" in logs and tokens > self.last[1] and state.global_step > self.last[2]:
            logs["tokens_per_sec_per_gpu"] = round((tokens - self.last[1]) / (now - self.last[0]) / self.world_size, 1)
            logs["step_seconds"] = round((now - self.last[0]) / (state.global_step - self.last[2]), 4)
            self.last = (now, tokens, state.global_step)
        if torch.cuda.is_available():
            logs["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}) + "\n")
            dpo = any(k.startswith(("rewards/", "eval_rewards/")) for k in logs)
            shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in logs.items()
                     if (k in SHOWN or k.startswith("eval_rewards/accuracies")) and not (dpo and "token_acc" in k)}
            if shown:
                log.info("step %d: %s", state.global_step, " ".join(f"{k}={v}" for k, v in shown.items()))


class StepClock(TrainerCallback):
    """train.step_clock: each step timed as the plain-TRL peer times it (../shared/peer/dpo_trl.py), from the
    GPU synchronized at the step's start to the GPU synchronized at its end, so the batch fetch and the logging
    fall outside. Rank 0 appends "<step> <seconds>" per step to <run_dir>/step_clock.txt. The two waits for the
    GPU cost the step some speed; the benchmark runs such a case beside one without them."""

    def __init__(self, run_dir: str):
        self.path = Path(run_dir, "step_clock.txt")
        self.started = 0.0
        self.cuda = torch.cuda.is_available()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(f"{state.global_step} {time.perf_counter() - self.started:.6f}\n")


SHOWN = ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "mean_token_accuracy", "learning_rate",
         "tokens_per_sec_per_gpu", "peak_gpu_mem_gib")
