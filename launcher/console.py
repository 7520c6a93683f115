"""What a person sees while a run trains: rank 0 alone talks to the console, with one progress display;
everything else goes to the rank logs (<run_dir>/logs/rank<R>.log).

- Library warnings reach rank 0's console unless they are known noise (launcher/early_logs.py: KNOWN_NOISE, matched by
  logger and message), so an unknown warning still shows; every record, noise included, is in the rank's log.
- Other ranks write nothing to the console: their stdout and stderr (stray prints, C++ warnings, a crash's
  traceback) go to their own log, where the launcher's post-mortem reads them.
- Progress: on a terminal, one tqdm bar (step / total, elapsed, ETA, loss, reward accuracy); elsewhere (a Slurm
  log, a pipe) a plain line with the same fields at the first step and at every log.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

# (this imports torch, accelerate, peft and bitsandbytes, which can warn as they are imported: launcher/early_logs.py
# holds their records from before it)
from transformers import TrainerCallback

from launcher.early_logs import KnownNoise, early_records

log = logging.getLogger("launcher")

LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "DeepSpeed", "deepspeed", "bitsandbytes",
             "torch", "liger_kernel", "py.warnings")


class OncePerTemplate(logging.Filter):
    """A warning repeated for every row (TRL warns per row on some tokenizers: 1,780 lines seen on one run) shows
    on the console once, by its logger and message template (before the row's values fill it in); the rank's log
    keeps every one."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class AboveTheBar(logging.StreamHandler):
    """Console lines printed above an open progress bar instead of through it (unflushed: the plan's environment
    has PYTHONUNBUFFERED=1)."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def rank_log(run_dir: str, rank: int) -> Path:
    return Path(run_dir, "logs", f"rank{rank}.log")


def setup(run_dir: str, rank: int) -> None:
    log_path = rank_log(run_dir, rank)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_path)
    file_handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    ours, libraries = [file_handler], [file_handler]
    if rank == 0:
        console = AboveTheBar(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        console.setLevel(logging.INFO)
        ours.append(console)
        warning = AboveTheBar(sys.stderr)
        warning.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        warning.setLevel(logging.WARNING)
        warning.addFilter(KnownNoise())
        warning.addFilter(OncePerTemplate())
        libraries.append(warning)
    else:  # nothing of this rank on the console; its log gets what it would have printed
        sys.stdout.flush(), sys.stderr.flush()
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(fd, 1), os.dup2(fd, 2)
        os.close(fd)
    launcher = logging.getLogger("launcher")
    launcher.handlers, launcher.propagate = ours, False
    launcher.setLevel(logging.DEBUG)
    root = logging.getLogger()
    root.removeHandler(early_records)
    root.handlers = libraries
    root.setLevel(logging.WARNING)
    route_libraries()
    logging.captureWarnings(True)
    for record in early_records.buffer:  # what was said before this
        if record.levelno >= logging.WARNING:
            root.handle(record)
    early_records.buffer.clear()
    import datasets
    import transformers

    # The model's loading and the dataset's tokenizing bars of every rank would interleave; the data report and
    # the banner say what they did
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def route_libraries() -> None:
    """The libraries' loggers give up their own handlers (DeepSpeed's prints to stdout) for ours, through the
    root; again once the trainer exists, for a library imported since (DeepSpeed sets up its logger then)."""
    for name in LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers, lib.propagate = [], True
        lib.setLevel(logging.WARNING)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress(TrainerCallback):
    """Rank 0's progress: a bar on a terminal, else plain lines; held-out results as lines either way."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.bar = None
        self.total = self.first = self.step = 0
        self.started = self.first_done = None
        self.latest: dict = {}
        self.printed = -1  # the step of the last plain line

    def begin(self, step: int, total: int) -> None:
        self.total, self.first, self.step, self.started = total, step, step, time.monotonic()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, file=self.stream, dynamic_ncols=True,
                            bar_format="{percentage:3.0f}% |{bar:24}| step {n_fmt}/{total_fmt}, {elapsed} elapsed, "
                                       "ETA {remaining}{postfix}")

    def advance(self, step: int) -> None:
        self.step = step
        if self.first_done is None:
            self.first_done = time.monotonic()
            if not self.tty:
                self.print_line()
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def logged(self, logs: dict) -> None:
        """A training log: the bar's loss and accuracy; off a terminal, a line."""
        for key in ("loss", "rewards/accuracies", "tokens_per_sec_per_gpu"):
            if key in logs:
                self.latest[key] = logs[key]
        if self.bar is not None:
            self.bar.set_postfix_str(self.metrics_text(), refresh=True)
        elif "loss" in logs and self.step > self.first + 1:
            self.print_line()

    def eta(self) -> float | None:
        """From the steps after the first (the first carries warm-up: allocation, compilation, caches)."""
        done = self.step - self.first - 1
        if self.first_done is None or done <= 0:
            return None
        return (self.total - self.step) * (time.monotonic() - self.first_done) / done

    def metrics_text(self) -> str:
        parts = []
        if "loss" in self.latest:
            parts.append(f"loss {self.latest['loss']:.4g}")
        if "rewards/accuracies" in self.latest:
            parts.append(f"acc {self.latest['rewards/accuracies']:.2f}")
        if "tokens_per_sec_per_gpu" in self.latest:
            parts.append(f"{self.latest['tokens_per_sec_per_gpu']:,.0f} tok/s/GPU")
        return ", ".join(parts)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        eta = self.eta()
        text = (f"step {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.0f}%), "
                f"{clock(elapsed)} elapsed, ETA {clock(eta) if eta is not None else '?'}")
        metrics = self.metrics_text()
        return f"{text}, {metrics}" if metrics else text

    def print_line(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.printed = self.step

    def close(self) -> None:
        if not self.tty and self.printed != self.step:  # the last step, where no log fell
            self.print_line()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # the Trainer's events, rank 0's only
    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.begin(state.global_step, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.advance(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        if any(k.startswith("eval_") for k in logs):
            pairs = "eval_rewards/margins" in logs  # (TRL logs a token accuracy of 0 for DPO too)
            shown = {k: v for k, v in logs.items() if k in ("eval_loss", "eval_rewards/accuracies",
                                                            "eval_rewards/margins")
                     or k == "eval_mean_token_accuracy" and not pairs}
            if shown:
                log.info("step %d: held out: %s", state.global_step,
                         ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in shown.items()))
        else:
            self.logged(logs)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.close()
