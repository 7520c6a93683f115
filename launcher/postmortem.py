"""After a failed run: which rank went first, and its last log lines.

Every rank's log ends with FINISHED, or FAILED and a traceback. A log that ends with neither belongs to
a rank that was killed (SIGKILL, the OOM killer): the likely root cause, named first.
"""
from __future__ import annotations

import re
from pathlib import Path

STARTED = "rank started"  # each launch appends to the same log: only what follows the last start counts
FINISHED = "rank finished"
FAILED = "launcher.train failed"
TAIL = 8


def explain_failure(run_dir: str) -> str:
    logs = sorted(Path(run_dir, "logs").glob("rank*.log"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    if not logs:
        return "no rank wrote a log: the processes did not start (see the output above)"
    killed, failed = [], []
    for path in logs:
        lines = path.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if STARTED in line]
        lines = lines[starts[-1]:] if starts else lines
        text = "\n".join(lines)
        if FAILED in text:
            failed.append((path, lines))
        elif FINISHED not in text:
            killed.append((path, lines))
    parts = []
    for path, lines in killed:
        parts.append(f"{path.stem} stopped without a word (killed: SIGKILL, the OOM killer, or a lost node); "
                     f"its last lines ({path}):\n" + "\n".join("    " + line for line in lines[-TAIL:]))
    for path, lines in failed:
        start = max(i for i, line in enumerate(lines) if FAILED in line)
        error = next((line for line in reversed(lines) if line and not line.startswith(" ")), "")
        parts.append(f"{path.stem} failed: {error.strip()} (traceback from line {start + 1} of {path})")
    return "\n".join(parts) or "every rank finished; the launcher itself failed (see the output above)"
