"""After a failed run: which rank went first, its last log lines, and which were stopped because of it.

Every rank's log ends with FINISHED, or FAILED and a traceback, or STOPPED where a signal stopped it (torchrun's
agent sends SIGTERM to the others once one rank has failed). A log that ends with none of them belongs to a rank
that was killed (SIGKILL, the OOM killer, a lost node): it went first, before the agent stopped anyone. Among
ranks that failed with a traceback, the earliest goes first.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from pathlib import Path

FULL_DISK_BYTES = 64 * 2**20
STARTED = "rank started"  # each launch appends to the same log: only what follows the last start counts
FINISHED = "rank finished"
FAILED = "launcher.train failed"
STOPPED = "rank stopped by signal"
TAIL = 8


def _this_launch(path: Path) -> list[str]:
    lines = path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if STARTED in line]
    return lines[starts[-1]:] if starts else lines


def _time(line: str) -> str:
    """The log line's clock time (the rank logs start with 'YYYY-MM-DD HH:MM:SS,mmm')."""
    return line[11:23].replace(",", ".") if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) else ""


def say_when_stopped(log) -> None:
    """A rank stopped by SIGTERM (torchrun's agent, once another rank has failed) says so in its log before it
    goes, so that the post-mortem does not take it for the rank that went first. It still dies of the signal.

    Python runs a signal's handler in the main thread, between two bytecodes: a rank waiting in a collective for
    the rank that died may never get there before the agent's SIGKILL (seen on 2x H200 under accelerate: both
    ranks' logs ended without a word). So the signal also wakes a thread of its own (Python's wakeup fd, written
    by the C-level handler at once), which logs while the main thread waits in C++ with the GIL released."""
    def stopped(signum, _frame):
        log.warning("%s %s", STOPPED, signal.Signals(signum).name)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stopped)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def watch():
        while True:
            for number in os.read(read, 64):
                if number == signal.SIGTERM:
                    log.warning("%s %s", STOPPED, "SIGTERM")

    threading.Thread(target=watch, name="stopped-by-signal", daemon=True).start()


def _on_host(lines: list[str]) -> str:
    """' on <host>' from the rank's start line, where it says."""
    start = next((line for line in lines if STARTED in line), "")
    return f" on {start.rsplit('host ', 1)[1].strip()}" if ", host " in start else ""


def explain_failure(run_dir: str, signal_name: str | None = None) -> str:
    """Which rank went first and why. `signal_name`: the user's signal that stopped the launch; a rank that then
    ended without a word was ended by the launcher, and went first only in that it did not stop when told."""
    logs = sorted(Path(run_dir, "logs").glob("rank*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not logs:
        return "no rank wrote a log: the processes did not start (see the output above)"
    killed, failed, stopped = [], [], []
    for path in logs:
        lines = _this_launch(path)
        text = "\n".join(lines)
        if FAILED in text:
            at = max(i for i, line in enumerate(lines) if FAILED in line)
            failed.append((_time(lines[at]), path, lines, at))
        elif STOPPED in text:
            stopped.append((path, next(line for line in reversed(lines) if STOPPED in line)))
        elif FINISHED not in text:
            killed.append((path, lines))
    failed.sort(key=lambda f: f[0])
    parts = []
    for path, lines in killed:
        why = (f"did not stop within the grace period after {signal_name} and was killed (hung, or busy outside "
               "Python)" if signal_name else "stopped without a word")
        how = "" if signal_name else " (killed: SIGKILL, the OOM killer, or a lost node)"
        parts.append(f"{path.stem} {why}{_on_host(lines)}{how}; its last lines ({path}):\n"
                     + "\n".join("    " + line for line in lines[-TAIL:]))
    for at_time, path, lines, at in failed:
        error = next((line for line in reversed(lines) if line and not line.startswith(" ")), "")
        parts.append(f"{path.stem} failed{_on_host(lines)}{' at ' + at_time if at_time else ''}: {error.strip()} "
                     f"(line {at + 1} of {path} on)")
    first = [p.stem for p, *_ in killed] or [f[1].stem for f in failed[:1]]
    for path, line in stopped:
        how = f"{line.split(STOPPED, 1)[1].strip() or 'a signal'} at {_time(line) or 'an unlogged time'}"
        parts.append(f"{path.stem} was stopped because {' and '.join(first)} had gone ({how}: the launch stops every "
                     "rank once one fails)" if first else f"{path.stem} was stopped ({how})")
    if parts and first and not signal_name:
        parts[0] = "first: " + parts[0]
    if (free := shutil.disk_usage(run_dir).free) < FULL_DISK_BYTES:  # a rank that cannot write cannot log either
        parts.insert(0, f"the run dir's filesystem has {free / 2**20:.0f} MiB free: a full disk stops a rank at its "
                        "next write (a checkpoint, a log line) and leaves its log without the error; free some space, "
                        "then resume=auto")
    return "\n".join(parts) or "every rank finished; the launcher itself failed (see the output above)"


class StallWatch:
    """While the job runs: once no rank's log has been touched for `quiet_s` (each rank touches it at every step,
    evaluation and save: launcher.logs.Heartbeat; a rank hung in a collective waits out the process group's timeout,
    30 minutes, without a word), say so, naming the rank quiet the longest; again after each `quiet_s` more. A
    load, merge or single step longer than that is warned about too."""

    def __init__(self, run_dir: str, quiet_s: float = 900.0):
        self.logs, self.quiet_s, self.warned_at = Path(run_dir, "logs"), quiet_s, 0.0

    def check(self, now: float | None = None) -> str | None:
        import time

        now = time.time() if now is None else now
        times = {p.stem: p.stat().st_mtime for p in self.logs.glob("rank*.log")}
        if not times or now - max(times.values()) < self.quiet_s or now - self.warned_at < self.quiet_s:
            return None
        self.warned_at = now
        quiet = min(times, key=times.get)
        return (f"no rank has logged for {(now - max(times.values())) / 60:.0f} min ({quiet} last, "
                f"{(now - times[quiet]) / 60:.0f} min ago): a rank may hang (`py-spy dump --pid <pid>` shows where; "
                "its pid is in its log's 'rank started' line); Ctrl-C stops the job")
