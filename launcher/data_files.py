"""Where a data file is wrong, said by line and file: users fix data files line by line. Read only after the
libraries have failed to read the data, so a good file costs nothing."""
from __future__ import annotations

import json
from pathlib import Path

FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def bad_json_line(p: Path) -> str:
    """For a JSON Lines file, the first line that does not parse, or whose column holds another kind of value than
    the lines before (a label "yes" among true and false): users fix files line by line."""
    if not (p.is_file() and p.suffix.lower() == ".jsonl"):
        return ""
    kinds: dict[str, tuple[str, int]] = {}
    with open(p, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    return f"Line {number} is not valid JSON ({exc.msg}). "
                for column, value in (row.items() if isinstance(row, dict) else ()):
                    if value is None:
                        continue
                    kind, first = kinds.setdefault(column, (_kind(value), number))
                    if _kind(value) != kind:
                        return (f"Line {number}: column {column!r} holds {_kind(value)} {value!r}, where line {first} "
                                f"holds {kind}. ")
    return ""


def folder_hint(p: Path) -> str:
    """For a folder, read as one dataset: the first file whose columns differ from the first file's, or the first
    JSON Lines file with a bad line."""
    if not p.is_dir():
        return ""
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_TYPES)
    seen: tuple[Path, list[str]] | None = None
    for f in files:
        if bad := bad_json_line(f):
            return f"{f.relative_to(p)}: {bad}"
        if (columns := _first_columns(f)) is None:
            continue
        if seen is None:
            seen = f, columns
        elif set(columns) != set(seen[1]):
            return (f"Its files are read as one dataset, and their columns differ: {f.relative_to(p)} has "
                    f"{', '.join(columns)}; {seen[0].relative_to(p)} has {', '.join(seen[1])}. Give data.path one file, "
                    "or a folder of files with the same columns. ")
    return ""


def not_utf8(p: Path) -> str:
    """The first line (of the file, or of the folder's files) that is not UTF-8, with the byte at fault."""
    for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
        if not f.is_file() or (p.is_dir() and FILE_TYPES.get(f.suffix.lower()) in (None, "parquet")):
            continue
        with open(f, "rb") as lines:
            for number, line in enumerate(lines, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as err:
                    return (f"line {number} of {f.name} is not UTF-8 (byte 0x{line[err.start]:02x} at byte "
                            f"{err.start + 1} of the line)")
    return ""


def _first_columns(f: Path) -> list[str] | None:
    """The columns of a JSON Lines or CSV file's first row (None for other kinds, or an empty file)."""
    with open(f, encoding="utf-8", errors="replace") as lines:
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        return None
    if f.suffix.lower() == ".csv":
        return [c.strip() for c in first.strip().split(",")]
    if f.suffix.lower() == ".jsonl":
        row = json.loads(first)
        return list(row) if isinstance(row, dict) else None
    return None


def _kind(value) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), "a number")
