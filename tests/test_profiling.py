"""launcher/profiling.py: the GPU-busy arithmetic (the profiler itself runs in tests/test_train.py's SFT run)."""
from launcher.profiling import busy_time


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_time([(0, 10), (5, 15), (20, 30)]) == 25  # two streams overlap 5..10, idle 15..20
    assert busy_time([(20, 30), (0, 40)]) == 40 and busy_time([]) == 0
