"""Faults: a rank killed mid-step, signals with a checkpoint first, ports in use, and resuming after each."""
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import read_metrics, run_launcher
from launcher import ROOT

pytestmark = pytest.mark.slow


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "launcher", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def rank_pids(run):
    pids = {}
    for path in (run / "logs").glob("rank*.log"):
        found = re.findall(r"rank started: rank (\d+), pid (\d+)", path.read_text())
        if found:
            pids[int(found[-1][0])] = int(found[-1][1])
    return pids


def test_rank_killed_mid_step_ends_the_job_names_the_rank_and_resume_finishes(tmp_path, tiny_dir):
    """With dataloader workers, as on GPUs: torchrun starts each rank in a session of its own, so a killed rank's
    workers are outside the job's process group (seen on 2x H200: one alive after the launcher returned)."""
    run = tmp_path / "run"
    args = [f"run_dir={run}", "train.max_steps=400", "save_steps=5", "data.max_length=64",
            "train.dataloader_workers=2"]
    proc = start(*args)
    wait_for(lambda: (run / "checkpoints" / "checkpoint-5" / "COMPLETE").exists() and len(rank_pids(run)) == 2, proc)
    pids = rank_pids(run)
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(pids[1])], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) >= 2, workers
    t0 = time.time()
    os.kill(pids[1], signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert time.time() - t0 < 60
    assert proc.returncode != 0
    assert re.search(r"first: rank1 stopped without a word on \S+ \(killed", out)  # not rank 0, stopped after it
    assert "rank0 stopped without a word" not in out
    assert "its last lines" in out and "logs/rank1.log" in out
    assert not [p for p in [*pids.values(), *workers] if alive(p)], "a process of the job outlived the launcher"
    assert subprocess.run(["pgrep", "-f", str(run)], capture_output=True).stdout == b""

    res = run_launcher(*args[:1], "train.max_steps=30", "save_steps=5", "data.max_length=64", "resume=auto",
                       timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "continuing from" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_step"] == 30


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_with_checkpoint_on_signal_saves_first(tmp_path, tiny_dir, sig):
    run = tmp_path / "run"
    args = [f"run_dir={run}", "train.max_steps=400", "save_steps=1000", "data.max_length=64",
            "checkpoint_on_signal=true"]
    proc = start(*args)
    wait_for(lambda: (run / "metrics.jsonl").exists(), proc)
    pids = rank_pids(run)
    t0 = time.time()
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert time.time() - t0 < 30
    assert proc.returncode == 75, out[-3000:]
    saved = list(run.glob("checkpoints/checkpoint-*/COMPLETE"))
    assert len(saved) == 1, out[-3000:]
    assert not any(alive(p) for p in pids.values())
    step = int(saved[0].parent.name.split("-")[1])
    res = run_launcher(f"run_dir={run}", f"train.max_steps={step + 3}", "data.max_length=64", "resume=auto",
                       "save_steps=1000", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"(step {step})" in res.stdout
    assert json.loads((run / "summary.json").read_text())["global_step"] == step + 3


def test_busy_port_single_node_takes_a_free_one_multi_node_names_it(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one = run_launcher("dry_run=true", "gpus=2", "backend=accelerate", f"master_port={port}",
                           f"run_dir={tmp_path}/a")
        assert one.returncode == 0
        assert f"master_port={port} is in use here: using free port" in one.stdout
        assert f"--main_process_port {port} " not in one.stdout
        many = run_launcher("gpus=2", "nodes=2", "node_rank=0", "master_addr=127.0.0.1", f"master_port={port}",
                            f"run_dir={tmp_path}/b", "dry_run=true")
        assert many.returncode == 2
        assert f"master_port: port {port} is already in use on this host" in many.stderr


def test_the_post_mortem_names_the_rank_that_went_first_and_the_ones_stopped_because_of_it(tmp_path):
    """As seen on 2x H200: rank 1 SIGKILLed, rank 0 then stopped by torchrun's SIGTERM (its log says so), rank 2
    failed with a traceback after it."""
    from launcher import postmortem

    logs = tmp_path / "logs"
    logs.mkdir()
    day = "2026-11-30 14:22:"
    (logs / "rank0.log").write_text(f"{day}01,000 rank0 launcher DEBUG {postmortem.STARTED}: rank 0, pid 10\n"
                                    f"{day}05,000 rank0 launcher INFO step 5: loss=0.69\n"
                                    f"{day}09,500 rank0 launcher WARNING {postmortem.STOPPED} SIGTERM\n")
    (logs / "rank1.log").write_text(f"{day}01,000 rank1 launcher DEBUG {postmortem.STARTED}: rank 1, pid 11\n"
                                    f"{day}02,000 rank1 launcher INFO data: 10 rows\n")
    (logs / "rank2.log").write_text(f"{day}01,000 rank2 launcher DEBUG {postmortem.STARTED}: rank 2, pid 12\n"
                                    f"{day}09,700 rank2 launcher ERROR {postmortem.FAILED}\nTraceback (most recent "
                                    "call last):\n  File \"x\", line 1\nRuntimeError: Connection closed by peer\n")
    lines = postmortem.explain_failure(str(tmp_path)).splitlines()
    assert lines[0].startswith("first: rank1 stopped without a word")
    assert any(line.startswith("rank2 failed at 14:22:09.700: RuntimeError: Connection closed by peer") for line in lines)
    assert ("rank0 was stopped because rank1 had gone (SIGTERM at 14:22:09.500: the launch stops every rank once "
            "one fails)") in lines
    (logs / "rank1.log").write_text(f"{day}01,000 rank1 launcher DEBUG {postmortem.STARTED}: rank 1, pid 11\n"
                                    f"{day}08,000 rank1 launcher ERROR {postmortem.FAILED}\nValueError: bad row\n")
    first = postmortem.explain_failure(str(tmp_path)).splitlines()[0]
    assert first.startswith("first: rank1 failed at 14:22:08.000: ValueError: bad row")  # before rank2's


def test_a_rank_that_does_not_stop_after_ctrl_c_is_not_blamed_on_the_oom_killer_and_a_stall_is_said(tmp_path,
                                                                                                    monkeypatch):
    """A hung rank (SIGSTOPped, or stuck in a collective) said nothing for the 30 minutes of the process group's
    timeout; after Ctrl-C, killed at the grace period's end, every rank read as killed by SIGKILL or the OOM killer."""
    from collections import namedtuple

    from launcher import postmortem

    shutil_usage = namedtuple("usage", "total used free")
    logs = tmp_path / "logs"
    logs.mkdir()
    for rank in (0, 1):
        (logs / f"rank{rank}.log").write_text(f"2026-11-30 14:22:01,000 rank{rank} launcher DEBUG "
                                              f"{postmortem.STARTED}: rank {rank}, pid 1{rank}\n")
    lines = postmortem.explain_failure(str(tmp_path), "SIGINT").splitlines()
    assert lines[0].startswith("rank0 did not stop within the grace period after SIGINT and was killed (hung")
    assert not any("OOM" in line or line.startswith("first:") for line in lines)
    # a full disk: the rank could not write its error either
    monkeypatch.setattr(postmortem.shutil, "disk_usage", lambda _: shutil_usage(total=2**30, used=2**30, free=0))
    assert postmortem.explain_failure(str(tmp_path)).startswith("the run dir's filesystem has 0 MiB free: a full disk")

    watch = postmortem.StallWatch(str(tmp_path), quiet_s=600)
    now = time.time()
    os.utime(logs / "rank0.log", (now - 700, now - 700))
    os.utime(logs / "rank1.log", (now - 900, now - 900))
    warning = watch.check(now)
    assert warning.startswith("no rank has logged for 12 min (rank1 last, 15 min ago): a rank may hang"), warning
    assert watch.check(now + 60) is None  # said once per quiet period
    os.utime(logs / "rank0.log", (now, now))
    assert watch.check(now + 300) is None  # rank0 logged again: the job moves


def test_a_loss_gone_nan_stops_the_run_saves_nothing_after_it_and_exits_nonzero(tmp_path, tiny_dir):
    """A learning rate far too high: the Trainer alone would save checkpoints, a final adapter and a merged model of
    NaN weights and exit 0. The run stops at the first non-finite log instead, and says why and from where to go on."""
    run = tmp_path / "run"
    res = run_launcher(f"run_dir={run}", "train.max_steps=8", "train.lr=1e6", "train.logging_steps=1",
                       "save_steps=1", "merge=true", timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-4000:]
    stopped = re.search(r"first: rank\d failed on \S+ at [\d:.]+: training stopped at step (\d+): the "
                        r"(loss|grad_norm) is (nan|inf)", out)
    assert stopped, out[-3000:]
    assert "train.lr=1000000.0); lower it" in out
    step = int(stopped[1])
    complete = sorted(int(p.parent.name.split("-")[1]) for p in (run / "checkpoints").glob("*/COMPLETE"))
    assert all(s < step for s in complete), complete
    assert not (run / "final").exists() and not (run / "merged").exists() and not (run / "summary.json").exists()
    losses = [row["loss"] for row in read_metrics(run) if "loss" in row]
    assert losses and not all(map(math.isfinite, [row.get("grad_norm", 0) for row in read_metrics(run)] + losses))


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGKILL])
def test_the_job_ends_with_the_launcher_hung_up_on_or_killed(tmp_path, tiny_dir, sig):
    """An ssh session dropped (SIGHUP) or the launcher SIGKILLed: torchrun and its ranks, in a session of their own,
    went on training with nobody to watch or stop them. SIGHUP is forwarded as SIGTERM is; the job's command gets
    SIGTERM when the launcher dies, whatever killed it (PR_SET_PDEATHSIG)."""
    run = tmp_path / "run"
    litter = lambda: set(glob.glob(os.path.join(tempfile.gettempdir(), "launcher-*")))  # noqa: E731
    before = litter()  # a SIGKILLed launcher leaves its gate folder and run-dir lock file: removed below
    # as from a terminal: SIGHUP not ignored (under nohup, as this suite may run, the launcher leaves it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", f"run_dir={run}", "train.max_steps=5000",
                             "save_steps=10000", "data.max_length=64"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(rank_pids(run)) == 2, proc)
    pids = rank_pids(run)
    proc.send_signal(sig)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == (129 if sig == signal.SIGHUP else -9), out[-2000:]
    deadline = time.time() + 40
    while any(alive(p) for p in pids.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids.values()), "a rank trained on without its launcher"
    while subprocess.run(["pgrep", "-f", str(run)], capture_output=True).stdout and time.time() < deadline:
        time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", str(run)], capture_output=True).stdout == b""
    for left in litter() - before:
        shutil.rmtree(left) if os.path.isdir(left) else os.unlink(left)
