"""`train.profile_steps=[A,B]`: torch.profiler over training steps A..B on rank 0, summarized in
<run_dir>/profile.txt. It answers the first question about a slow step: is the GPU busy (the union of its
kernels' time against the wall clock), and which ops take the GPU's and the CPU's time.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger("launcher")
FILE = "profile.txt"


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals, in the units given (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def gpu_spans(prof) -> tuple[list, list]:
    """(every kernel, the kernels that are not NCCL communication), as (start_us, end_us)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    return spans, compute


class ProfileSteps(TrainerCallback):
    def __init__(self, run_dir: str, first: int, last: int):
        self.path, self.first, self.last = Path(run_dir, FILE), first, last
        self.prof, self.started = None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.first or not state.is_world_process_zero:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.last:
            self.finish()

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None:  # training ended inside the profiled steps: summarize the ones it ran
            self.last = state.global_step
            self.finish()

    def finish(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self.started) * 1e3
        self.prof.__exit__(None, None, None)
        steps = self.last - self.first + 1
        spans, compute = gpu_spans(self.prof)
        lines = [f"steps {self.first}-{self.last} on rank 0: {wall_ms / steps:.1f} ms per step (wall clock)"]
        averages = self.prof.key_averages()
        if spans:
            busy, busy_compute = busy_time(spans) / 1e3, busy_time(compute) / 1e3  # us -> ms
            lines += [f"GPU busy {busy / steps:.1f} ms per step ({busy / wall_ms:.0%} of the wall clock); without "
                      f"NCCL kernels {busy_compute / steps:.1f} ms ({busy_compute / wall_ms:.0%})",
                      "", "by GPU time:", averages.table(sort_by="self_cuda_time_total", row_limit=30)]
        lines += ["", "by CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        self.path.write_text("\n".join(lines) + "\n")
        log.info("profile of steps %d-%d: %s", self.first, self.last, self.path)
        self.prof = None
