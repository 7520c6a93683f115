"""The only place that writes a run directory and starts processes.

The child (accelerate / torchrun / deepspeed) runs in its own process group so that Ctrl-C and
SIGTERM reach every rank through us, and nothing is left behind: forward the signal, give the
ranks a grace period to save, then kill the whole group.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.checkpoints import EXIT_STOPPED, STOP_FILE, STOPPED_FILE
from launcher.plan import LaunchPlan

GRACE_SECONDS = 20


def prepare_run_dir(plan: LaunchPlan, state: str) -> None:
    run_dir = Path(plan.run_dir)
    if state == "overwrite":
        shutil.rmtree(run_dir)  # validate.check_run_dir allows this only for a launcher run dir
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (STOP_FILE, STOPPED_FILE):  # a stop request was for the launch before this one
        (run_dir / name).unlink(missing_ok=True)
    for name, content in plan.files.items():
        tmp = run_dir / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(content)
        if name.endswith((".sh", ".sbatch")):
            tmp.chmod(0o755)
        os.replace(tmp, run_dir / name)  # nodes sharing the run directory never read half a file


def ensure_builtin_model(settings: dict) -> None:
    """Build the embedded model once per cache dir, in a child process (the launcher never imports torch)."""
    if not settings.get("builtin_model") or Path(settings["model_path"], "config.json").exists():
        return
    print(f"launcher: building the {settings['builtin_model']} model into {settings['builtin_dir']}", flush=True)
    subprocess.run([sys.executable, "-m", "launcher.tiny", settings["builtin_model"], settings["builtin_dir"]],
                   check=True)


def resolve_executable(name: str) -> str:
    """The console script of the Python that runs us (a venv need not be activated)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run the launch command, forwarding Ctrl-C / SIGTERM to its whole process group; its exit code."""
    proc = subprocess.Popen([resolve_executable(argv[0]), *argv[1:]], env={**os.environ, **env},
                            start_new_session=True)
    received: list[int] = []
    deadline = [float("inf")]

    def forward(signum, _frame):
        received.append(signum)
        deadline[0] = min(deadline[0], time.monotonic() + GRACE_SECONDS)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline[0]:
                    _kill_group(proc.pid)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _kill_group(proc.pid)
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    if received:
        print(f"launcher: stopped by {signal.Signals(received[0]).name}", file=sys.stderr, flush=True)
        return code or 128 + received[0]
    return code


def _kill_group(pgid: int) -> None:
    """Whatever of the job is still alive (a rank that ignored the signal) goes now."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute(plan: LaunchPlan, state: str) -> int:
    ensure_builtin_model(plan.settings)
    prepare_run_dir(plan, state)
    print(f"launcher: {plan.backend} -> {plan.world_size} process(es), run_dir {plan.run_dir}", flush=True)
    print("launcher: " + " ".join(plan.argv), flush=True)
    code = run_child(plan.argv, plan.env)
    if (Path(plan.run_dir) / STOPPED_FILE).exists():
        print(f"launcher: stopped on request at a complete checkpoint; exit {EXIT_STOPPED} (resume=auto continues)",
              file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return code
