"""Ranks that start while the launcher's checks run, and the gate they wait at.

A rank spends most of its start-up importing torch, transformers, TRL and the rest (about 20 s on a fresh GPU
machine); the launcher's checks (launcher/preflight.py: tokenizer, data, checkpoint) take about as long, and ran
before any rank started. With `start_ranks_early` the launcher starts the job first: each rank imports its libraries,
then waits here, having read nothing of the run directory and touched no GPU, until the checks have passed and the run
directory is written (the launcher creates `go` in the gate directory). When the checks fail, the launcher ends the
job; the run directory is as it was. A rank whose launcher is gone stops waiting and exits.

The launcher side (`decide`, `imports_to_warm`, `Gate`) imports nothing heavy; `wait` runs in the rank.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from launcher import methods

ENV = "LAUNCHER_GATE"  # the gate directory
PARENT_ENV = "LAUNCHER_GATE_PARENT"  # the launcher's pid: a rank whose launcher died stops waiting
WARM_ENV = "LAUNCHER_GATE_IMPORTS"  # modules a rank imports while it waits (comma-separated)
GO = "go"


def decide(cfg: dict) -> tuple[bool, str | None]:
    """Whether the ranks start while the checks run, and the plan's line saying so."""
    if not cfg.get("start_ranks_early", True):
        return False, None
    if cfg["nodes"] > 1 and cfg.get("overwrite"):
        return False, ("start_ranks_early -> off: with overwrite=true every node's launcher replaces the shared "
                       "run directory, which must be done before any rank of any node starts writing to it")
    return True, ("start_ranks_early=true: the ranks import their libraries while the launcher checks the data and "
                  "the checkpoint, then wait at a gate, reading nothing of run_dir, until the checks pass "
                  "(launcher/gate.py; start_ranks_early=false: the checks first, then the ranks)")


def imports_to_warm(cfg: dict, settings: dict) -> list[str]:
    """What every rank of this job will import, so that it does so while it waits."""
    names = ["datasets", methods.TRAINER_MODULES[cfg["method"]["name"]]]
    if cfg["lora"]["r"] is not None:
        names.append("peft")
    if settings.get("deepspeed_config"):
        names.append("deepspeed")
    return names  # (not bitsandbytes: its import asks CUDA for the device, before the rank has chosen its GPU)


class Gate:
    """The launcher's side: a directory of its own (never the run directory), staged copies of the files the launch
    command reads before any rank starts, and the `go` the ranks wait for."""

    def __init__(self, imports: list[str]):
        self.dir = Path(tempfile.mkdtemp(prefix="launcher-gate-"))
        self.env = {ENV: str(self.dir), PARENT_ENV: str(os.getpid()), WARM_ENV: ",".join(imports)}

    def stage(self, argv: list[str], files: dict[str, str], run_dir: str) -> list[str]:
        """The command with each run-directory file it reads at launch (accelerate's --config_file) taken from a copy
        in the gate directory, the same content: the run directory is written only after the checks."""
        staged = []
        for arg in argv:
            name = os.path.relpath(arg, run_dir) if os.path.isabs(arg) else None
            if name in files and name != "config.yaml":  # config.yaml: read by the ranks, after the gate
                Path(self.dir, name).write_text(files[name])
                arg = str(self.dir / name)
            staged.append(arg)
        return staged

    def open(self) -> None:
        Path(self.dir, GO).touch()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def wait() -> float:
    """In a rank, before it reads its config: import what the job will use, then wait for the launcher's `go`.
    Returns the seconds spent waiting after the imports (0 without a gate: a command run by hand)."""
    gate = os.environ.get(ENV)
    if not gate:
        return 0.0
    for name in filter(None, os.environ.get(WARM_ENV, "").split(",")):
        try:
            methods.import_module(name)
        except Exception:  # an import that fails will fail again where it is used, with its own message
            pass
    started, parent = time.monotonic(), int(os.environ.get(PARENT_ENV, "0"))
    go = Path(gate, GO)
    while not go.exists():
        if parent and not _alive(parent):
            sys.exit(0)  # the launcher is gone: nothing was started on its behalf yet
        time.sleep(0.05)
    return time.monotonic() - started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: a launcher that has exited lingers as a zombie until its own parent reaps it
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return True


def stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the process's name (state, parent pid, process group, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
