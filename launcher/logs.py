"""The run's records: rank 0 talks to the trackers (wandb, tensorboard) and appends every logged metric to
<run_dir>/metrics.jsonl; train.step_clock times single steps. What the console shows: launcher/console.py.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from launcher.console import rank_log

log = logging.getLogger("launcher")


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
    """metrics.jsonl (rank 0); seconds per step, tokens/s per GPU, the padding share and peak GPU memory added to
    every log."""

    def __init__(self, run_dir: str, world_size: int):
        self.path = Path(run_dir, "metrics.jsonl")
        self.world_size = world_size
        self.last = None  # (time, tokens seen, step)
        self.computed, self.real = 0, 0  # this rank's training forwards: positions run, and real tokens among them
        self.own_tokens = 0.0  # this rank's real tokens before the last padding_share(), for the trainers that log
        # no num_tokens (ORPO, CPO)
        self.first_step = 0

    def this_launch_loss(self, training_loss: float, global_step: int) -> float:
        """The mean training loss of this launch's steps: the Trainer divides this launch's loss by every step,
        a resumed run's earlier ones too (0.14 for a run whose steps each had 0.69)."""
        steps = global_step - self.first_step
        return training_loss * global_step / steps if steps > 0 else training_loss

    def count_computed_tokens(self, model) -> None:
        """Count the positions each training forward of `model` runs and the real tokens among them (a padded
        batch's mask is summed on the GPU and read at the next log, so no step waits for it)."""
        def count(module, args, kwargs):
            if not (module.training and torch.is_grad_enabled()):  # the policy's pass, not DPO's reference pass
                return
            if kwargs.get("pf_index") is not None:  # launcher/padding_free.py: real tokens only
                self.computed += kwargs["pf_index"].numel()
                self.real = self.real + kwargs["pf_index"].numel()
                return
            ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
            if ids is not None:
                self.computed += ids.numel()
                self.real = self.real + (mask.sum() if mask is not None else ids.numel())

        model.register_forward_pre_hook(count, with_kwargs=True)

    def padding_share(self) -> float | None:
        """Of the positions this rank's model ran since the last call, the share that was padding."""
        computed, real = self.computed, float(self.real)
        self.computed, self.real, self.own_tokens = 0, 0, self.own_tokens + real
        return round(1 - real / computed, 4) if computed else None

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step  # a resumed run's: the checkpoint's
        self.last = (time.perf_counter(), 0, state.global_step)  # TRL counts num_tokens from 0 in each process
        self.padding_share()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        now, tokens = time.perf_counter(), logs.get("num_tokens")  # TRL's: non-padding tokens of all ranks
        if tokens is None and "loss" in logs:  # ORPO and CPO log none: this rank's own count, as every rank's
            tokens = (self.own_tokens + float(self.real)) * self.world_size
        if self.last and "loss" in logs and tokens and tokens > self.last[1] and state.global_step > self.last[2]:
            real_per_gpu = (tokens - self.last[1]) / self.world_size
            logs["tokens_per_sec_per_gpu"] = round(real_per_gpu / (now - self.last[0]), 1)
            logs["step_seconds"] = round((now - self.last[0]) / (state.global_step - self.last[2]), 4)
            if (share := self.padding_share()) is not None:
                logs["padding_share"] = share
            self.last = (now, tokens, state.global_step)
        if torch.cuda.is_available():
            logs["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if state.is_world_process_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}) + "\n")


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


class CompileReport(TrainerCallback):
    """train.compile: after this run's first step (whose forward and backward compiled the layers; a resumed run's
    first step too), what it compiled and how long it took; later, what a training step compiled anew (a batch
    shape that dynamic shapes did not cover). What an evaluation compiles (eval mode) is not blamed on training."""

    def __init__(self):
        from torch._dynamo.utils import counters  # dynamo's own tallies, since the process started

        self.counters, self.started, self.reported, self.frames, self.graphs = counters, None, False, 0, 0

    def _counts(self) -> tuple[int, int]:
        return self.counters["frames"]["ok"], self.counters["stats"]["unique_graphs"]

    def on_step_begin(self, args, state, control, **kwargs):
        if self.started is None:
            self.started = time.time()
            self.frames, self.graphs = self._counts()

    def on_step_end(self, args, state, control, **kwargs):
        frames, graphs = self._counts()
        if not self.reported:
            log.info("train.compile: %d graphs compiled in the first step (%.1f s), %d graph breaks",
                     graphs - self.graphs, time.time() - self.started, sum(self.counters["graph_break"].values()))
            self.reported = True
        elif frames > self.frames:
            log.info("train.compile: %d more frames compiled at step %d (a batch shape not seen before)",
                     frames - self.frames, state.global_step)
        self.frames, self.graphs = frames, graphs

    def on_evaluate(self, args, state, control, **kwargs):
        self.frames, self.graphs = self._counts()


class NonFiniteLoss(TrainerCallback):
    """Stops the run at the first log whose loss or gradient norm is NaN or infinite: past it every update is
    poisoned, and the Trainer would go on to save checkpoints, a final adapter and a merged model of NaN weights, and
    exit 0. The logged values are the ranks' mean, so every rank stops at the same step; that step is not saved."""

    def __init__(self, float16: bool = False):
        self.bad: tuple[int, str, float] | None = None  # (step, what, value)
        self.last_good_step = 0
        # in float16 the loss scaler skips a step whose gradients overflow (an infinite norm), then scales down:
        # a healthy run's early steps do that, so only the loss counts there
        self.watched = ("loss",) if float16 else ("loss", "grad_norm")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.watched:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                self.bad = self.bad or (state.global_step, key, value)
        if self.bad:
            control.should_training_stop, control.should_save = True, False
        elif logs and "loss" in logs:
            self.last_good_step = state.global_step

    def message(self, cfg: dict) -> str:
        step, what, value = self.bad
        return (f"training stopped at step {step}: the {what} is {value} (the last log with a finite loss and "
                f"gradient norm was at step {self.last_good_step}). Nothing from step {step} on is saved. The usual "
                f"cause is a learning rate too high for this model (train.lr={cfg['train']['lr']}); lower it, or look "
                "for a bad row or a bad checkpoint. Checkpoints saved between those two logs may hold non-finite "
                f"weights: resume from one at or before step {self.last_good_step}.")


class Heartbeat(TrainerCallback):
    """Touches this rank's log at each step's end, evaluation and save: the launcher's stall warning
    (launcher/postmortem.StallWatch) reads the logs' times, and a healthy rank logs little while it trains."""

    def __init__(self, run_dir: str, rank: int):
        self.path = rank_log(run_dir, rank)

    def _beat(self) -> None:
        try:
            os.utime(self.path)
        except OSError:
            pass

    def on_step_end(self, args, state, control, **kwargs):
        self._beat()

    def on_evaluate(self, args, state, control, **kwargs):
        self._beat()

    def on_save(self, args, state, control, **kwargs):
        self._beat()
