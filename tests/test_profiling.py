"""launcher/profiling.py: the GPU-busy arithmetic (the profiler itself runs in tests/test_train.py's SFT run)."""
import sys
import time

import torch

from launcher.profiling import PythonSampler, busy_time, host_ops_in, idle_gaps, outermost_host_ops, python_at


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_time([(0, 10), (5, 15), (20, 30)]) == 25  # two streams overlap 5..10, idle 15..20
    assert busy_time([(20, 30), (0, 40)]) == 40 and busy_time([]) == 0


def test_idle_gaps_are_the_longest_waits_of_the_gpu_with_what_the_host_ran_meanwhile():
    kernels = [(0, 10), (5, 12), (40, 50), (52, 60), (100, 110)]  # idle 12..40 (28), 50..52 (2), 60..100 (40)
    host = [("enumerate(DataLoader)", 60, 90), ("aten::item", 85, 99), ("aten::item", 30, 35), ("aten::mm", 0, 5)]
    gaps = idle_gaps(kernels, min_gap=3)
    assert gaps == [(60, 40), (12, 28)]  # 2 is under min_gap
    assert host_ops_in(gaps[0], host) == [("enumerate(DataLoader)", 30), ("aten::item", 14)]
    assert host_ops_in(gaps[1], host) == [("aten::item", 5)]
    assert idle_gaps([], 1) == []


def test_outermost_host_ops_are_the_ops_nothing_encloses_on_a_real_profile():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("fetch_batch"):
            x = torch.ones(64, 64) @ torch.ones(64, 64)
        x.sum().item()
    ops = outermost_host_ops(prof.events())
    names = [name for name, _, _ in ops]
    assert "fetch_batch" in names and "aten::item" in names
    assert "aten::mm" not in names  # inside fetch_batch
    start, end = next((s, e) for n, s, e in ops if n == "fetch_batch")
    assert 0 < end - start < 60e6  # microseconds


def walk_in_python_for(seconds: float) -> int:
    """Pure Python, no op the profiler records: what a module walk between two forwards looks like to it."""
    end, n = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        n += sum(range(200))
    return n


def test_python_at_names_the_innermost_frames_and_skips_plumbing():
    def inner():
        return python_at(sys._getframe(), depth=2)
    assert inner() == "test_profiling.py:inner < test_profiling.py:test_python_at_names_the_innermost_frames_and_skips_plumbing"


def test_the_python_sampled_in_a_window_of_the_profilers_clock_is_what_ran_there():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sampler = PythonSampler()
        sampler.start()
        torch.ones(256, 256) @ torch.ones(256, 256)
        begin = time.perf_counter() * 1e6
        walk_in_python_for(0.05)
        end = time.perf_counter() * 1e6
        torch.ones(256, 256) @ torch.ones(256, 256)
        sampler.stop()
    sampler.align(prof.events())
    shift = sampler.shift
    found = sampler.in_gap((begin + shift, end - begin))
    assert found and found[0][0].startswith("test_profiling.py:walk_in_python_for")
    assert found[0][1] >= 4  # one sample per ms or, while the walk holds the GIL, per switch interval (5 ms)
    assert sampler.in_gap((begin + shift - 1e6, 1e5)) == []  # a second earlier: nothing sampled
