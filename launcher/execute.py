"""The only place that writes a run directory and starts processes.

The child (accelerate / torchrun / deepspeed) runs in its own process group so that Ctrl-C and
SIGTERM reach every rank through us, and nothing is left behind: forward the signal, give the
ranks a grace period to save, then kill the whole group.
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from launcher.checkpoints import EXIT_NOTHING_LEFT, EXIT_STOPPED, STOP_FILE, STOPPED_FILE
from launcher.gate import Gate, stat_fields
from launcher.plan import LaunchPlan
from launcher.postmortem import StallWatch, explain_failure

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # linux/prctl.h

GRACE_SECONDS = 20  # after a forwarded signal, before SIGKILL
SAVE_SECONDS = 300  # checkpoint_on_signal: how long the ranks get to save before the signal goes through


def prepare_run_dir(plan: LaunchPlan, state: str) -> None:
    run_dir = Path(plan.run_dir)
    if state == "overwrite":
        shutil.rmtree(run_dir)  # validate.check_run_dir allows this only for a launcher run dir
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    # the last launch's settings, kept by whichever node still finds them (the nodes share the run directory)
    if state == "resume" and saved.is_file() and (old := saved.read_text()) != plan.files.get("config.yaml"):
        _write(run_dir, "config.previous.yaml", old)
    # a stop request was for the launch before this one; its results are not this launch's (a report would call a
    # resumed run that fails "finished")
    for name in (STOP_FILE, STOPPED_FILE, "summary.json", "samples.json"):
        (run_dir / name).unlink(missing_ok=True)
    for name, content in plan.files.items():
        _write(run_dir, name, content)


def _write(run_dir: Path, name: str, content: str) -> None:
    """Written whole and renamed into place: nodes sharing the run directory never read half a file. A full disk (a
    quota) is said, and its half-written file removed; nothing has started yet."""
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(content)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _say(f"launcher: error: run_dir: cannot write {name} into {run_dir} ({err.strerror or err}): free some "
             "space there, or give another run_dir")
        raise SystemExit(2) from None
    if name.endswith((".sh", ".sbatch")):
        tmp.chmod(0o755)
    os.replace(tmp, run_dir / name)


def ensure_builtin_model(settings: dict) -> None:
    """Build the embedded model once per cache dir, in a child process (the launcher never imports torch)."""
    if not settings.get("builtin_model") or Path(settings["model_path"], "config.json").exists():
        return
    print(f"launcher: building the {settings['builtin_model']} model into {settings['builtin_dir']}", flush=True)
    subprocess.run([sys.executable, "-m", "launcher.tiny", json.dumps(settings["builtin_shape"]),
                    settings["builtin_dir"]], check=True)


@contextmanager
def preflight_process(plan: LaunchPlan) -> Iterator[subprocess.Popen]:
    """Data, tokenizer and resume checks in a child process, before anything in the run directory changes; ended
    if still running when the block is left."""
    with tempfile.TemporaryDirectory(prefix="launcher-preflight-") as tmp:
        config = Path(tmp, "config.yaml")
        config.write_text(plan.files["config.yaml"])
        checks = subprocess.Popen([sys.executable, "-m", "launcher.preflight", str(config)])
        try:
            yield checks
        finally:
            if checks.poll() is None:
                checks.terminate()
            checks.wait()


def preflight(plan: LaunchPlan) -> int:
    with preflight_process(plan) as checks:
        return shell_code(checks.wait())


def shell_code(code: int) -> int:
    """A child's exit status as a shell reports it: 128 + N when signal N killed it."""
    return 128 - code if code < 0 else code


def resolve_executable(name: str) -> str:
    """The console script of the Python that runs us (a venv need not be activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def run_child(argv: list[str], env: dict[str, str], stop_file: Path | None = None,
              checks: subprocess.Popen | None = None, go: Callable[[], None] | None = None,
              watch: Callable[[], str | None] | None = None) -> int:
    """Run the launch command, forwarding Ctrl-C / SIGTERM to its whole process group; its exit code.

    With a stop_file, the first signal asks the ranks to checkpoint and stop (launcher.checkpoints) and
    only a second signal, or SAVE_SECONDS without an exit, goes through to them.
    With `checks` (the preflight, running while the ranks wait at a gate, launcher/gate.py): `go` (which writes the
    run directory and opens the gate) is called once they pass. Their failure, a signal, or the job ending first
    ends the job instead, and nothing is written. `watch`, asked now and then while the job runs: a warning to print.
    """
    _subreaper(True)
    spare = frozenset(_alive(None)) | frozenset(_zombie_children())  # what was below us before the job
    proc = subprocess.Popen([resolve_executable(argv[0]), *argv[1:]], env={**os.environ, **env},
                            start_new_session=True, preexec_fn=_ended_with_the_launcher(os.getpid()))
    received: list[int] = []
    deadline = [float("inf")]
    saving = [stop_file is not None and checks is None]  # (no STOP file before the run directory is written)

    def forward(signum, _frame):
        received.append(signum)
        if saving[0] and len(received) == 1:
            stop_file.touch()
            _say(f"launcher: {signal.Signals(signum).name}: saving a checkpoint first (signal again to stop at once)")
            deadline[0] = time.monotonic() + SAVE_SECONDS
            return
        deadline[0] = min(deadline[0], time.monotonic() + GRACE_SECONDS)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    # SIGHUP too (the terminal or ssh session gone), unless it was ignored from the start (nohup): the job must not
    # train on with nobody watching and no launcher to stop it
    ours = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
                                              else [])
    old = {s: signal.signal(s, forward) for s in ours}
    try:
        if checks is not None:
            while checks.poll() is None and proc.poll() is None and not received:
                time.sleep(0.05)
            cut_short = checks.poll() is None
            if cut_short:  # a signal, or the job ended: their verdict no longer matters
                checks.terminate()
                checks.wait()
            if received:
                _say(f"launcher: stopped by {signal.Signals(received[0]).name} before the launch")
                return 128 + received[0]
            if not cut_short and checks.returncode:
                return shell_code(checks.returncode)
            if proc.poll() is not None:  # (its ranks could not even start: their error is above)
                code = shell_code(proc.returncode) or 1
                print(f"launcher: {argv[0]} ended (exit {code}) before the launch; the run directory is as it was",
                      file=sys.stderr, flush=True)
                return code
            go()
            saving[0] = stop_file is not None
        watched = time.monotonic()
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if watch and time.monotonic() - watched > 10:
                    watched = time.monotonic()
                    if warning := watch():
                        _say(f"launcher: warning: {warning}")
                if time.monotonic() > deadline[0]:
                    if saving[0] and len(received) == 1:  # the save took too long: stop now
                        forward(received[0], None)
                    else:
                        _kill_group(proc.pid, spare=spare)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _kill_group(proc.pid, spare=spare)
        _subreaper(False)  # what a caller starts later is none of ours
    code = shell_code(code)
    if received and not (stop_file is not None and stop_file.with_name(STOPPED_FILE).exists()):
        _say(f"launcher: stopped by {signal.Signals(received[0]).name}")
        return 128 + received[0]  # as a shell says it, whatever the job's command made of the signal
    return code


def _say(line: str) -> None:
    """To stderr, where a terminal hung up (SIGHUP) fails every write: the job must still be stopped as asked."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _ended_with_the_launcher(launcher_pid: int) -> Callable[[], None]:
    """For the job's command, between fork and exec: SIGTERM to it when the launcher dies, of SIGKILL too (nothing of
    ours runs then), and torchrun's agent ends its ranks on SIGTERM. Linux's PR_SET_PDEATHSIG; elsewhere nothing."""
    def in_the_child() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            return
        if os.getppid() != launcher_pid:  # the launcher died before the line above
            os._exit(1)
    return in_the_child


def _subreaper(on: bool) -> None:
    """Make the launcher the reaper of its job's orphans (or stop): torchrun starts each rank in a session of its own,
    out of reach of the job's process group, and a killed rank's dataloader workers (holding its GPU memory) would
    pass to init, alive for seconds after the launcher returned (seen on 2x H200). As the launcher's children they
    can be found and ended. Linux's PR_SET_CHILD_SUBREAPER; elsewhere nothing changes."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int, wait_s: float = 30.0, spare: frozenset = frozenset()) -> None:
    """Whatever of the job is still alive (a rank that ignored the signal, a dead rank's dataloader workers
    holding its GPU memory) goes now, in the job's process group or below the launcher; returns once none of it
    is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + wait_s
    while True:
        _reap(keep=pgid, spare=spare)  # (the job's command leads its group: its pid is the group's id)
        left = _alive(pgid, spare)
        if not left or time.monotonic() > deadline:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _reap(keep: int, spare: frozenset = frozenset()) -> None:
    """Collect the exit of every child that has ended (orphans adopted from the job end as our zombies), but the
    job's own command's (`keep`), which its Popen collects, and those a caller had before the job (`spare`)."""
    for pid in _zombie_children():
        if pid != keep and pid not in spare:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat_fields(stat.parent.name)[:3]
        except (OSError, ValueError):
            continue
        found.append((int(stat.parent.name), state, int(ppid), int(pgrp)))
    return found


def _zombie_children() -> list[int]:
    me = os.getpid()
    return [pid for pid, state, ppid, _ in _processes() if state == "Z" and ppid == me]


def _alive(pgid: int | None, spare: frozenset = frozenset()) -> list[int]:
    """The processes that have not exited (zombies have) in the job's group or below the launcher, except those
    below it before the job started (`spare`: whatever else a caller of run_child has running)."""
    processes = _processes()
    # (a parent that has just exited is a zombie whose children are not yet handed on to us: walk through it)
    parents = {pid: ppid for pid, _, ppid, _ in processes}
    living = [(pid, pgrp) for pid, state, _, pgrp in processes if state != "Z"]
    in_group = [pid for pid, pgrp in living if pgrp == pgid]
    below, me = [], os.getpid()
    for pid, _ in living:
        up, seen = parents.get(pid), 0
        if pid in spare:
            continue
        while up and up != me and up not in spare and seen < 64:
            up, seen = parents.get(up), seen + 1
        if up == me:
            below.append(pid)
    return sorted(set(in_group) | set(below))


def write_report(plan: LaunchPlan, exit_code: int) -> None:
    """<run_dir>/report.html after every run that started its ranks, finished or not; node 0 writes it (the run
    directory is shared). Only a look at the run: a failure to write it is a warning, never the job's exit code."""
    if not plan.settings or plan.node_rank != 0 or not Path(plan.run_dir, "logs").is_dir():  # (sbatch: submitted)
        return
    try:
        from launcher.report import write_report as write  # matplotlib: only now, not for a dry run

        print(f"launcher: report: {write(plan.run_dir, exit_code)}", flush=True)
    except Exception as err:
        _say(f"launcher: warning: no report written ({type(err).__name__}: {err}); "
             f"`python -m launcher report {plan.run_dir}` tries again")


def announce(plan: LaunchPlan) -> None:
    print(f"launcher: {plan.backend} -> {plan.world_size} process(es), run_dir {plan.run_dir}", flush=True)
    print("launcher: " + " ".join(plan.argv), flush=True)


@contextmanager
def run_dir_lock(plan: LaunchPlan) -> Iterator[str | None]:
    """Held from the checks to the job's end, per run directory and node on this host: a second launch into the same
    run directory would pass the same checks and write the same checkpoints and logs. Yields the pid of the launcher
    that holds it, or None where this one now does. (The lock goes with the process, SIGKILL too; the nodes of a
    multi-node job share the run directory from other hosts, or take their own node's lock.)"""
    key = hashlib.sha256(f"{Path(plan.run_dir).resolve()}\0{plan.node_rank}".encode()).hexdigest()[:24]
    path = Path(tempfile.gettempdir(), f"launcher-run-{key}.lock")
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            yield lock.read().strip() or "?"
            return
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield None
        finally:
            path.unlink(missing_ok=True)


def execute(plan: LaunchPlan, state: str) -> int:
    if not plan.settings:  # cluster=slurm: sbatch submits, and the nodes take their locks
        return launch(plan, state)
    with run_dir_lock(plan) as holder:
        if holder:
            print(f"launcher: error: run_dir: another launcher on this host (pid {holder}) is running in "
                  f"{plan.run_dir}{f' as node_rank={plan.node_rank}' if plan.nodes > 1 else ''}; wait for it to end, "
                  "or give another run_dir", file=sys.stderr, flush=True)
            return 2
        return launch(plan, state)


def launch(plan: LaunchPlan, state: str) -> int:
    stop_file = Path(plan.run_dir, STOP_FILE) if plan.settings.get("checkpoint_on_signal") else None
    env = dict(plan.env)
    if plan.backend in ("torchrun", "accelerate") and plan.procs_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = "1"  # torchrun's own choice for several ranks on a host, set without its banner
        # (not for DeepSpeed's launcher, which leaves it unset: its CPU Adam runs on OpenMP threads)
    if plan.settings:  # a local launch (cluster=slurm submits a job, whose nodes check for themselves)
        ensure_builtin_model(plan.settings)
    if plan.settings.get("start_ranks_early"):
        gate, written = Gate(plan.settings["gate_imports"]), []

        def go() -> None:
            prepare_run_dir(plan, state)
            written.append(True)
            announce(plan)
            gate.open()

        try:
            with preflight_process(plan) as checks:
                code = run_child(gate.stage(plan.argv, plan.files, plan.run_dir), {**env, **gate.env}, stop_file,
                                 checks=checks, go=go, watch=StallWatch(plan.run_dir).check)
        finally:
            gate.remove()
        if not written:  # the checks failed, a signal came, or the job ended first: the run directory is as it was
            return 0 if code == EXIT_NOTHING_LEFT else code
    else:
        if plan.settings and (code := preflight(plan)):
            return 0 if code == EXIT_NOTHING_LEFT else code
        prepare_run_dir(plan, state)
        announce(plan)
        code = run_child(plan.argv, env, stop_file, watch=StallWatch(plan.run_dir).check)
    if (Path(plan.run_dir) / STOPPED_FILE).exists():
        _say(f"launcher: stopped on request at a complete checkpoint; exit {EXIT_STOPPED} (resume=auto continues)")
        code = EXIT_STOPPED
    elif code and Path(plan.run_dir, "logs").is_dir():
        by = signal.Signals(code - 128).name if code in (128 + signal.SIGINT, 128 + signal.SIGTERM,
                                                        128 + signal.SIGHUP) else None
        _say(f"launcher: the run {'was stopped by ' + by if by else 'failed'} (exit {code}):\n"
             f"{explain_failure(plan.run_dir, by)}")
    write_report(plan, code)
    return code
