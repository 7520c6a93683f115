"""launcher/console.py: rank 0's progress lines and bar, known library noise kept off the console, other ranks
silent there. The whole console of a real run is checked in tests/test_train.py."""
import io
import subprocess
import sys
import textwrap

import pytest

from launcher import console


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(console.time, "monotonic", fake)
    return fake


def test_plain_lines_at_the_first_step_each_log_and_the_end_with_an_eta(clock):
    out = io.StringIO()  # not a terminal: plain lines
    progress = console.Progress(out)
    progress.begin(0, 100)
    clock.now += 30  # the first step: warm-up, left out of the ETA
    progress.advance(1)
    for step in range(2, 11):
        clock.now += 2
        progress.advance(step)
    progress.logged({"loss": 0.6931, "rewards/accuracies": 0.75, "tokens_per_sec_per_gpu": 12345.6})
    clock.now += 2
    progress.advance(11)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 1/100 (1%), 0:30 elapsed, ETA ?"
    # 9 steps in 18 s after the first: 90 left take 180 s
    assert lines[1] == "step 10/100 (10%), 0:48 elapsed, ETA 3:00, loss 0.6931, acc 0.75, 12,346 tok/s/GPU"
    assert lines[2].startswith("step 11/100 (11%), 0:50 elapsed, ETA 2:58")  # the last step, no log there
    assert len(lines) == 3


def test_resumed_progress_counts_from_the_checkpoint(clock):
    out = io.StringIO()
    progress = console.Progress(out)
    progress.begin(40, 50)
    clock.now += 10
    progress.advance(41)
    clock.now += 9
    for step in range(42, 45):
        clock.now += 3
        progress.advance(step)
    assert progress.eta() == pytest.approx(6 * 18 / 3)  # 6 steps left at the 3 s/step since step 41
    assert out.getvalue().startswith("step 41/50 (82%)")


RANK_SCRIPT = textwrap.dedent("""
    import logging, sys, warnings
    from launcher import early_logs
    early_logs.hold()  # as launcher/train.py does, before the libraries (console imports transformers)
    from launcher import console
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: x")   # known noise, before setup
    logging.getLogger("peft.tuners").warning("an early warning nobody knows")
    console.setup(sys.argv[1], int(sys.argv[2]))
    warnings.warn("`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead.", FutureWarning)
    warnings.warn("a new warning from somewhere", UserWarning)
    logging.getLogger("launcher").info("launcher says hello")
    for row in range(5):  # as TRL warns for each row on some tokenizers
        logging.getLogger("trl.trainer.dpo_trainer").warning("row %d: the prompt is not a prefix", row)
    print("a stray print", flush=True)
""")


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_shows_unknown_warnings_and_hides_known_noise_rank0_alone_on_the_console(tmp_path, rank):
    res = subprocess.run([sys.executable, "-c", RANK_SCRIPT, str(tmp_path), str(rank)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    shown = res.stdout + res.stderr
    logged = (tmp_path / "logs" / f"rank{rank}.log").read_text()
    for text in ("gemm_4bit_forward", "broadcast_buffers", "an early warning nobody knows", "a new warning",
                 "launcher says hello"):
        assert text in logged  # every record is in the rank's log
    if rank == 0:
        assert "gemm_4bit_forward" not in shown and "broadcast_buffers" not in shown
        assert "an early warning nobody knows" in shown and "a new warning from somewhere" in shown
        assert "launcher says hello" in shown and "a stray print" in shown
        assert shown.count("the prompt is not a prefix") == 1 and logged.count("the prompt is not a prefix") == 5
    else:
        assert shown == ""
        assert "a stray print" in logged  # what rank 1 prints goes to its log
