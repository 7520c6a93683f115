"""`train.profile_steps=[A,B]`: torch.profiler over training steps A..B on rank 0, summarized in
<run_dir>/profile.txt. It answers the first questions about a slow step: is the GPU busy (the union of its
kernels' time against the wall clock), where it waits (its idle gaps, each with what the host ran meanwhile),
and which ops take the GPU's and the CPU's time.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
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


def idle_gaps(kernels: list[tuple[float, float]], min_gap: float) -> list[tuple[float, float]]:
    """The GPU's idle gaps between kernels of at least `min_gap`, longest first, as (start, length)."""
    gaps, end = [], None
    for start, stop in sorted(kernels):
        if end is not None and start - end >= min_gap:
            gaps.append((end, start - end))
        end = stop if end is None else max(end, stop)
    return sorted(gaps, key=lambda g: -g[1])


def host_ops_in(gap: tuple[float, float], host_ops: list[tuple[str, float, float]]) -> list[tuple[str, float]]:
    """The host ops (name, start, end) that overlap the gap (start, length), with how much of it each covers,
    most first; ops of one name add up."""
    start, length = gap
    overlap: dict[str, float] = {}
    for name, s, e in host_ops:
        inside = min(e, start + length) - max(s, start)
        if inside > 0:
            overlap[name] = overlap.get(name, 0.0) + inside
    return sorted(overlap.items(), key=lambda kv: -kv[1])


def outermost_host_ops(events) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of the profiled host ops that no other op encloses, on every thread."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in events
            if e.device_type == torch.autograd.DeviceType.CPU and e.cpu_parent is None]


def gpu_spans(prof) -> tuple[list, list]:
    """(every kernel, the kernels that are not NCCL communication), as (start_us, end_us)."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in kernels]
    compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    return spans, compute


PLUMBING = {"module.py", "contextlib.py", "threading.py", "wrapper.py", "_contextlib.py"}  # frames that say little


def python_at(frame, depth: int = 5) -> str:
    """The innermost `depth` frames of a Python stack, plumbing left out: 'file.py:function < caller.py:...'."""
    names = []
    while frame is not None and len(names) < depth:
        file = os.path.basename(frame.f_code.co_filename)
        if file not in PLUMBING:
            names.append(f"{file}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(names)


class PythonSampler:
    """Samples the training thread's Python stack from a side thread, for the gaps in which the GPU idles while
    the host runs no op the profiler records (pure Python, such as walking the model's modules). It asks every
    millisecond; while the training thread holds the GIL in pure Python, it gets a sample per switch interval
    (5 ms). The profiler's clock is tied to this one by a marker op recorded at start."""

    MARKER = "launcher: python sampler start"

    def __init__(self, interval_s: float = 0.001):
        self.interval, self.target = interval_s, threading.get_ident()
        self.samples: list[tuple[float, str]] = []  # (perf_counter in us, python_at)
        self.done, self.thread, self.marked_at, self.shift = threading.Event(), None, 0.0, None

    def start(self) -> None:
        with torch.profiler.record_function(self.MARKER):
            self.marked_at = time.perf_counter() * 1e6
        self.thread = threading.Thread(target=self.run, daemon=True, name="launcher-python-sampler")
        self.thread.start()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            frame = sys._current_frames().get(self.target)
            if frame is not None:
                self.samples.append((time.perf_counter() * 1e6, python_at(frame)))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def align(self, events) -> None:
        """Finds the marker among the profiled events: from then on, samples are placed on the profiler's clock."""
        marker = next((e.time_range.start for e in events if e.name == self.MARKER), None)
        self.shift = None if marker is None else marker - self.marked_at

    def in_gap(self, gap: tuple[float, float]) -> list[tuple[str, int]]:
        """(stack, samples) of the samples that fall in the gap (start, length in the profiler's us), most first."""
        if self.shift is None:
            return []
        start, length = gap
        return Counter(where for t, where in self.samples if start <= t + self.shift <= start + length).most_common()


class ProfileSteps(TrainerCallback):
    def __init__(self, run_dir: str, first: int, last: int):
        self.path, self.first, self.last = Path(run_dir, FILE), first, last
        self.prof, self.sampler, self.started = None, None, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 != self.first or not state.is_world_process_zero:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.sampler = PythonSampler()
        self.sampler.start()
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
        self.sampler.stop()
        self.prof.__exit__(None, None, None)
        steps = self.last - self.first + 1
        spans, compute = gpu_spans(self.prof)
        lines = [f"steps {self.first}-{self.last} on rank 0: {wall_ms / steps:.1f} ms per step (wall clock)"]
        averages = self.prof.key_averages()
        if spans:
            busy, busy_compute = busy_time(spans) / 1e3, busy_time(compute) / 1e3  # us -> ms
            lines += [f"GPU busy {busy / steps:.1f} ms per step ({busy / wall_ms:.0%} of the wall clock); without "
                      f"NCCL kernels {busy_compute / steps:.1f} ms ({busy_compute / wall_ms:.0%})",
                      *self.gap_lines(spans, steps), "", "by GPU time:",
                      averages.table(sort_by="self_cuda_time_total", row_limit=30)]
        lines += ["", "by CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=30)]
        self.path.write_text("\n".join(lines) + "\n")
        log.info("profile of steps %d-%d: %s", self.first, self.last, self.path)
        self.prof = None

    def gap_lines(self, spans: list[tuple[float, float]], steps: int) -> list[str]:
        """The GPU's idle gaps of 1 ms or more and the outermost host ops running meanwhile (a metric read back
        from the GPU shows as aten::item, a batch fetch as enumerate(DataLoader)#...)."""
        gaps = idle_gaps(spans, min_gap=1000.0)  # us
        events = self.prof.events()
        host = outermost_host_ops(events)
        self.sampler.align(events)
        t0 = min(s for s, _ in spans)
        lines = ["", f"GPU idle in gaps of 1 ms or more: {sum(g[1] for g in gaps) / 1e3 / steps:.1f} ms per step "
                     f"({len(gaps)} gaps); the longest, with the outermost host ops in them (ms of the gap each) "
                     f"and the Python stacks sampled in them (a sample per 1-5 ms):"]
        for start, length in gaps[:12]:
            ops = host_ops_in((start, length), host)
            shown = ", ".join(f"{name[:60]} {ms / 1e3:.1f}" for name, ms in ops[:4])
            lines.append(f"  {length / 1e3:6.1f} ms at +{(start - t0) / 1e3:.1f} ms: {shown or '(no host op)'}")
            lines += [f"      python x{n}: {where}" for where, n in self.sampler.in_gap((start, length))[:3]]
        return lines
