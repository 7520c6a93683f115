"""Execution: a real torchrun under launcher.execute.run_child; signals reach every rank, nothing is left."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from conftest import run_launcher
from launcher import ROOT, execute

WORKER = textwrap.dedent("""
    import os, sys, time
    open(os.path.join(sys.argv[1], f"pid{os.environ['RANK']}"), "w").write(str(os.getpid()))
    print(f"rank {os.environ['RANK']} up", flush=True)
    time.sleep(600)
""")
DRIVER = textwrap.dedent("""
    import sys
    from launcher.execute import run_child
    sys.exit(run_child(["torchrun", "--standalone", "--nproc-per-node", "2", sys.argv[1], sys.argv[2]], {}))
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def start(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "worker.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while len(list(tmp_path.glob("pid*"))) < 2:
        assert time.time() < deadline and proc.poll() is None, "workers did not start"
        time.sleep(0.2)
    return proc, [int(p.read_text()) for p in tmp_path.glob("pid*")]


def test_sigterm_reaches_every_rank_and_exits_nonzero(tmp_path):
    proc, pids = start(tmp_path)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in out
    assert "rank 0 up" in out and "rank 1 up" in out  # the children's output streams through
    while any(alive(p) for p in pids) and time.time() - t0 < 30:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), "a rank outlived the launcher"


def test_ctrl_c_reaches_every_rank(tmp_path):
    proc, pids = start(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "stopped by SIGINT" in out
    time.sleep(1)
    assert not any(alive(p) for p in pids)


def test_child_failure_code_is_the_launchers(tmp_path):
    code = subprocess.run([sys.executable, "-c", "from launcher.execute import run_child; import sys; "
                           "sys.exit(run_child([sys.executable, '-c', 'import sys; sys.exit(3)'], {}))"]).returncode
    assert code == 3


def test_the_launcher_returns_only_when_every_process_of_the_job_is_gone(tmp_path):
    """A rank that dies leaves its dataloader worker behind (same process group, holding the rank's memory): the
    launcher kills it and waits for it before it returns."""
    pid_file = tmp_path / "worker.pid"
    rank = ("import os, signal, subprocess, sys, time\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
            "time.sleep(0.5)\n"
            "os._exit(1)\n")
    code = subprocess.run([sys.executable, "-c", "from launcher.execute import run_child; import sys; "
                           f"sys.exit(run_child([sys.executable, '-c', {rank!r}], {{}}))"], timeout=60).returncode
    worker = int(pid_file.read_text())
    assert code == 1
    assert not alive(worker), "the dead rank's worker outlived the launcher's return"


def test_a_parent_that_has_just_exited_does_not_hide_its_children(monkeypatch):
    """A killed torchrun is a zombie for a moment, its ranks not yet handed on to the launcher (the subreaper): they
    are still the job's, found through it (a failed check once left both ranks running this way)."""
    me = os.getpid()
    table = [(me, "S", 1, me), (9001, "Z", me, 9001), (9002, "S", 9001, 9002), (9003, "S", 9002, 9002),
             (9004, "S", 1, 9004)]  # torchrun (exited), its rank, the rank's worker; someone else's process
    monkeypatch.setattr(execute, "_processes", lambda: table)
    assert execute._alive(None) == [9002, 9003]


CHECKED = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from launcher.execute import run_child
    job, checks, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    with subprocess.Popen([sys.executable, "-c", checks]) as proc:
        code = run_child([sys.executable, "-c", job], {}, checks=proc, go=lambda: marker.touch())
        print("checks", proc.poll(), flush=True)
    sys.exit(code)
""")
SLEEP = "import time; time.sleep(60)"


def checked(tmp_path, job: str, checks: str, signal_after: float | None = None):
    proc = subprocess.Popen([sys.executable, "-c", CHECKED, job, checks, str(tmp_path / "went")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_after:
        time.sleep(signal_after)
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, (tmp_path / "went").exists()


def test_the_launch_goes_on_only_when_the_checks_pass_and_the_job_is_still_there(tmp_path):
    code, out, went = checked(tmp_path, "import time; time.sleep(4)", "import time; time.sleep(1)")
    assert (code, went) == (0, True) and "checks 0" in out
    code, out, went = checked(tmp_path / "a", SLEEP, "import sys; sys.exit(2)")  # the checks fail
    assert (code, went) == (2, False)
    code, out, went = checked(tmp_path / "b", "import sys; sys.exit(7)", SLEEP)  # the ranks could not start
    assert (code, went) == (7, False) and "ended (exit 7) before the launch" in out
    assert "checks -15" in out  # the checks were ended, not waited for


def test_a_signal_during_the_checks_stops_checks_and_job_before_the_launch(tmp_path):
    t0 = time.time()
    code, out, went = checked(tmp_path, SLEEP, SLEEP, signal_after=3)
    assert (code, went) == (143, False) and "stopped by SIGTERM before the launch" in out
    assert "checks -15" in out and time.time() - t0 < 30


def test_a_second_launch_into_a_run_dir_in_use_is_refused_before_it_writes(tmp_path):
    """Two launches into one new run directory both passed the checks and wrote the same checkpoints and logs."""
    from types import SimpleNamespace

    from launcher.execute import run_dir_lock

    run = tmp_path / "run"
    with run_dir_lock(SimpleNamespace(run_dir=str(run), node_rank=0)) as holder:
        assert holder is None  # this process holds it now
        res = run_launcher(f"run_dir={run}", "train.max_steps=2")
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        assert f"run_dir: another launcher on this host (pid {os.getpid()}) is running in {run}" in res.stderr
        assert not run.exists()
        other_node = run_dir_lock(SimpleNamespace(run_dir=str(run), node_rank=1))
        assert other_node.__enter__() is None  # node 1 of a multi-node job on the same host takes its own
        other_node.__exit__(None, None, None)


def test_a_resume_keeps_the_last_launchs_config_and_a_full_disk_leaves_no_half_file(tmp_path):
    from types import SimpleNamespace

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train: {lr: 5.0e-05}\n")
    plan = SimpleNamespace(run_dir=str(run), node_rank=0, files={"config.yaml": "train: {lr: 0.0001}\n"})
    execute.prepare_run_dir(plan, "resume")
    assert (run / "config.previous.yaml").read_text() == "train: {lr: 5.0e-05}\n"
    assert (run / "config.yaml").read_text() == "train: {lr: 0.0001}\n"
    # a file the disk has no room for (ulimit -f: the write fails with EFBIG, as with ENOSPC)
    script = (f"import resource, signal, types; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); from launcher import execute; "
              f"execute.prepare_run_dir(types.SimpleNamespace(run_dir={str(tmp_path / 'full')!r}, node_rank=0, "
              f"files={{'config.yaml': 'x' * 1000}}), 'new')")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"launcher: error: run_dir: cannot write config.yaml into {tmp_path / 'full'} (File too large)" in res.stderr
    assert list((tmp_path / "full").iterdir()) == []
