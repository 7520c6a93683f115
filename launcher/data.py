"""Loading, checking and formatting the training data for DPO and SFT.

Every problem a user can fix is a DataError naming the file and the column, raised before the
model is loaded (so before any GPU work).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from launcher import data_files
from launcher.methods import METHODS

log = logging.getLogger("launcher")

PREFERENCE = ("prompt", "chosen", "rejected")


class DataError(Exception):
    pass


@dataclass
class DataReport:
    rows_read: int
    dropped_empty: int
    dropped_duplicate: int
    truncated: int
    prompt_too_long: int
    train_rows: int
    eval_rows: int
    fmt: str
    longest_row: int = 0  # the train row (counted from 1 in data.path's train split) that puts the most tokens
    longest_tokens: int = 0  # through the model: both sequences of a pair, each cut at max_length, with its EOS
    note: str = ""  # what was done to the rows beyond the counts (KTO's pairs split)

    def line(self, max_length: int) -> str:
        return (f"data: {self.rows_read} rows read ({self.fmt}), dropped {self.dropped_empty} with empty fields and "
                f"{self.dropped_duplicate} duplicates or pairs with the same two answers, {self.truncated} longer than "
                f"max_length={max_length} "
                f"(truncated), {self.prompt_too_long} whose prompt alone fills it (dropped); "
                f"{self.train_rows} train / {self.eval_rows} held out{self.note}")


def read_dataset(path: str, split: str, test_split: str):
    """Returns (train, test or None). Local files and folders by extension; anything else is a hub id."""
    import datasets

    p = Path(path).expanduser()
    try:
        if p.is_file():
            kind = data_files.FILE_TYPES.get(p.suffix.lower())
            if kind is None:
                raise DataError(f"data.path={path}: unknown file type {p.suffix!r}; use .jsonl, .json, .parquet or .csv")
            loaded = datasets.load_dataset(kind, data_files=str(p))
        elif p.is_dir():
            loaded = datasets.load_dataset(str(p))
        else:
            loaded = datasets.load_dataset(path)
    except DataError:
        raise
    except Exception as exc:  # the libraries' own errors say little about which file is at fault
        cache = Path(datasets.config.HF_DATASETS_CACHE).expanduser().resolve()
        if isinstance(exc, OSError) and exc.filename and cache in [Path(exc.filename).resolve(),
                                                                    *Path(exc.filename).resolve().parents]:
            raise DataError(f"data.path={path}: the datasets cache cannot be used ({exc.strerror}: {exc.filename}), "
                            "not the data: point HF_DATASETS_CACHE (or HF_HOME) at a folder this user can write") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"data.path={path}: cannot be read as {p.suffix or 'a dataset'} ({first}). "
                        f"{data_files.bad_json_line(p) or data_files.folder_hint(p)}Check the file's format.") from None
    if split not in loaded:
        raise DataError(f"data.path={path}: no split {split!r} (it has {', '.join(loaded)}); set data.split")
    return loaded[split], loaded[test_split] if test_split in loaded else None


def detect_format(columns: list[str], method: str, path: str) -> str:
    cols = set(columns)
    rows = METHODS[method].rows
    pairs, labelled = {"chosen", "rejected"} <= cols, {"prompt", "completion", "label"} <= cols
    if rows == "pairs":
        if pairs:
            return "preference"
        kto = " These are KTO's rows (prompt/completion/label): use method=kto." if labelled else ""
        missing = [c for c in PREFERENCE if c not in cols]
        raise DataError(f"data.path={path}: {method.upper()} needs columns prompt, chosen, rejected; missing "
                        f"{', '.join(missing)} (columns found: {', '.join(columns)}).{kto}")
    if rows == "labelled":
        if labelled:
            return "unpaired"
        if pairs:
            return "preference"
        if "completion" in cols and "label" not in cols:
            raise DataError(f"data.path={path}: KTO needs a 'label' column beside prompt and completion (true: a "
                            f"desirable answer, false: an undesirable one), or preference pairs (prompt/chosen/"
                            f"rejected), which are split into one of each; columns found: {', '.join(columns)}")
        raise DataError(f"data.path={path}: KTO needs columns prompt, completion, label (or prompt, chosen, "
                        f"rejected); columns found: {', '.join(columns)}")
    for fmt, needed in (("messages", {"messages"}), ("prompt_completion", {"prompt", "completion"}),
                        ("alpaca", {"instruction", "output"}), ("text", {"text"})):
        if needed <= cols:
            return fmt
    other = (" This is a preference file (chosen/rejected): use method=dpo, orpo, simpo or kto, or give SFT rows."
             if pairs else "")
    raise DataError(f"data.path={path}: SFT needs a 'messages' column, 'prompt' and 'completion', 'instruction' and "
                    f"'output' (Alpaca), or 'text'; columns found: {', '.join(columns)}.{other}")


def required_columns(fmt: str) -> tuple[str, ...]:
    return {"preference": PREFERENCE, "unpaired": ("prompt", "completion", "label"), "messages": ("messages",),
            "prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "output"),
            "text": ("text",)}[fmt]


def where(path: str, split: str, position: int) -> str:
    """Row `position` (from 0) of a split, as a user finds it: its line in a JSON Lines file."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".jsonl":
        with open(p, encoding="utf-8", errors="replace") as f:
            lines = (number for number, line in enumerate(f, 1) if line.strip())
            for seen, number in enumerate(lines):
                if seen == position:
                    return f"line {number}"
    return f"row {position + 1} of split {split!r}"


def unpair(rows: list[dict]) -> list[dict]:
    """Each preference pair as KTO's two rows: its chosen answer desirable, its rejected one undesirable. A pair
    without a prompt column has it implicit, as the common start of chosen and rejected (TRL's extract_prompt)."""
    out = []
    for row in rows:
        if "prompt" not in row:
            from trl.data_utils import extract_prompt

            row = extract_prompt(row)
        out += [{"prompt": row["prompt"], "completion": row["chosen"], "label": True},
                {"prompt": row["prompt"], "completion": row["rejected"], "label": False}]
    return out


def _empty(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def _not_text(value) -> str | None:
    """Why a required column's value is neither text nor a conversation TRL can render; None where it is one."""
    if isinstance(value, str):
        return None
    if not isinstance(value, list):
        return f"holds {type(value).__name__} {str(value)[:60]!r}, not text"
    for message in value:
        if not (isinstance(message, dict) and "role" in message and "content" in message):
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            return (f"holds a message without 'role' and 'content' ({keys}; ShareGPT's 'from'/'value' are not "
                    "read: rename them)")
    return None


def _as_messages(value, role: str):
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def to_trl_row(row: dict, fmt: str, conversational: bool) -> dict:
    """One row in the shape TRL's trainers take: conversational when the chat template is to be used."""
    if fmt == "preference":
        if "prompt" not in row:  # an implicit prompt: TRL takes the common start of chosen and rejected
            return {"chosen": row["chosen"], "rejected": row["rejected"]}
        prompt = row["prompt"]
        if conversational:
            return {"prompt": _as_messages(prompt, "user"), "chosen": _as_messages(row["chosen"], "assistant"),
                    "rejected": _as_messages(row["rejected"], "assistant")}
        return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}
    if fmt == "unpaired":
        completion = row["completion"]
        if conversational:
            return {"prompt": _as_messages(row["prompt"], "user"), "completion": _as_messages(completion, "assistant"),
                    "label": row["label"]}
        return {"prompt": row["prompt"], "completion": completion, "label": row["label"]}
    if fmt == "alpaca":
        prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        row = {"prompt": prompt, "completion": row["output"]}
        fmt = "prompt_completion"
    if fmt == "prompt_completion":
        if conversational:
            return {"prompt": _as_messages(row["prompt"], "user"),
                    "completion": _as_messages(row["completion"], "assistant")}
        return {"prompt": row["prompt"], "completion": row["completion"]}
    if fmt == "messages":
        return {"messages": row["messages"]}
    return {"text": row["text"]}


def _lengths(row: dict, tokenizer) -> tuple[int, list[int]]:
    """Tokens of (the prompt, each sequence the trainer will build from this row)."""
    if "messages" in row:
        return 0, [len(_ids(tokenizer.apply_chat_template(row["messages"], tokenize=True)))]
    if "text" in row:
        return 0, [len(tokenizer(row["text"])["input_ids"])]
    answers = [row["chosen"], row["rejected"]] if "chosen" in row else [row["completion"]]
    prompt = row.get("prompt", [] if isinstance(answers[0], list) else "")
    if isinstance(prompt, list):
        sequences = [len(_ids(tokenizer.apply_chat_template(prompt + a, tokenize=True))) for a in answers]
        return (len(_ids(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)))
                if prompt else 0), sequences
    return len(tokenizer(prompt)["input_ids"]), [len(tokenizer(prompt + a)["input_ids"]) for a in answers]


def _ids(out):
    return out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out


def prepare(data_cfg: dict, method: str, tokenizer, seed: int):
    """(train, eval, report): checked, deduplicated, formatted rows."""
    path = data_cfg["path"]
    train, test = read_dataset(path, data_cfg["split"], data_cfg["test_split"])
    if len(train) == 0:
        raise DataError(f"data.path={path}: the dataset is empty (split {data_cfg['split']!r})")
    fmt = detect_format(train.column_names, method, path)
    answer = {"preference": "chosen", "unpaired": "completion"}.get(fmt)
    needs_template = fmt == "messages" or (answer is not None and isinstance(train[0][answer], list))
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if needs_template and not has_template:
        raise DataError(f"data.path={path}: rows are conversations but the tokenizer has no chat template; "
                        "set model.chat_template to a Jinja template (or a file holding one)")
    wanted = data_cfg.get("conversational", "auto")
    conversational = needs_template or (has_template and fmt != "text" and wanted in ("auto", True))

    def clean(ds, name):
        """(rows, their positions in ds, empty ones dropped, duplicates dropped (pairs whose answers are the same
        among them))"""
        cols = [c for c in required_columns(fmt) if c in ds.column_names]  # DPO's prompt may be implicit
        rows, positions, seen, empty, dup, same = [], [], set(), 0, 0, 0
        for position, row in enumerate(ds):
            if any(_empty(row[c]) for c in cols):
                empty += 1
                continue
            for c in (c for c in cols if c != "label"):
                if why := _not_text(row[c]):
                    raise DataError(f"data.path={path}, {where(path, name, position)}: column {c!r} {why}; give "
                                    "text, or a list of {'role', 'content'} messages")
            if fmt == "messages" and not any(m["role"] == "assistant" for m in row["messages"]):
                raise DataError(f"data.path={path}, {where(path, name, position)}: no message has role 'assistant' "
                                f"(roles {sorted({m['role'] for m in row['messages']})}); SFT learns the assistant's "
                                "turns: name the roles system, user and assistant")
            if fmt == "preference" and row["chosen"] == row["rejected"]:  # nothing to prefer: no gradient
                same += 1
                continue
            if fmt == "unpaired" and str(row["label"]).lower() in ("true", "false"):  # a CSV's column of strings
                row = dict(row, label=str(row["label"]).lower() == "true")
            if fmt == "unpaired" and not isinstance(row["label"], bool):
                raise DataError(f"data.path={path}, {where(path, name, position)}: column 'label' must be true "
                                f"(a desirable answer) or false (an undesirable one), got {row['label']!r}")
            key = json.dumps([row.get(c) for c in cols], ensure_ascii=False, sort_keys=True)
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            rows.append(to_trl_row(row, fmt, conversational))
            positions.append(position)
        if data_cfg.get("max_rows"):
            rows, positions = rows[: data_cfg["max_rows"]], positions[: data_cfg["max_rows"]]
        if not rows:
            raise DataError(f"data.path={path}: no usable rows in {name} after dropping empty ones"
                            + (f" and {same} whose chosen and rejected are the same" if same else ""))
        return rows, positions, empty, dup + same

    import datasets

    read = len(train) + (len(test) if test is not None else 0)
    try:
        train_rows, train_sources, empty, dup = clean(train, "train")
        if test is not None:
            eval_rows, _, e2, d2 = clean(test, data_cfg["test_split"])
            empty, dup = empty + e2, dup + d2
    except UnicodeDecodeError as err:  # datasets reads the bytes as they are; a row's text is decoded only here
        raise DataError(f"data.path={path}: {data_files.not_utf8(Path(path).expanduser()) or err}. Save it as UTF-8 (e.g. "
                        "iconv -f latin1 -t utf-8 in > out).") from None
    if test is not None:
        train_ds, eval_ds = datasets.Dataset.from_list(train_rows), datasets.Dataset.from_list(eval_rows)
        sources = train_sources
    else:
        if len(train_rows) * data_cfg["test_fraction"] < 1 or len(train_rows) < 2:
            raise DataError(f"data.path={path}: {len(train_rows)} usable rows are too few to hold out "
                            f"data.test_fraction={data_cfg['test_fraction']}; add rows or a '{data_cfg['test_split']}' split")
        numbered = datasets.Dataset.from_list(train_rows).add_column("_row", train_sources)
        split = numbered.train_test_split(test_size=data_cfg["test_fraction"], seed=seed)
        sources = split["train"]["_row"]
        train_ds, eval_ds = split["train"].remove_columns("_row"), split["test"].remove_columns("_row")
    note = ""
    if METHODS[method].rows == "labelled":
        if fmt == "preference":  # split after holding out, so no pair has a half on each side
            note = f"; each of the {len(train_ds)} train pairs split into a desirable and an undesirable row for KTO"
            sources = [s for s in sources for _ in (0, 1)]
            train_ds, eval_ds = (datasets.Dataset.from_list(unpair(list(ds))) for ds in (train_ds, eval_ds))
        # TRL's KTO reads its rows in order and takes the KL term from neighbours: no run of one label, no neighbour
        # that is the same prompt's other answer (held-out rows too: their KL term is taken the same way)
        numbered = train_ds.add_column("_row", sources).shuffle(seed=seed).flatten_indices()
        sources, train_ds = numbered["_row"], numbered.remove_columns("_row")
        eval_ds = eval_ds.shuffle(seed=seed).flatten_indices()
    max_length = data_cfg["max_length"]
    lengths = [_lengths(r, tokenizer) for r in train_ds]
    truncated = sum(max(seqs) > max_length for _, seqs in lengths)
    prompt_too_long = sum(prompt >= max_length for prompt, _ in lengths)
    if prompt_too_long == len(lengths):
        raise DataError(f"data.path={path}: every prompt is at least data.max_length={max_length} tokens long "
                        f"(shortest {min(p for p, _ in lengths)}), so nothing is left to learn from; "
                        "raise data.max_length")
    if METHODS[method].keeps_empty_answers and prompt_too_long:  # ORPO, SimPO: their trainers keep such rows (NaN)
        keep = [i for i, (prompt, _) in enumerate(lengths) if prompt < max_length]
        train_ds, sources, lengths = train_ds.select(keep), [sources[i] for i in keep], [lengths[i] for i in keep]
        eval_ds = eval_ds.select([i for i, row in enumerate(eval_ds) if _lengths(row, tokenizer)[0] < max_length])
        if not len(eval_ds):
            raise DataError(f"data.path={path}: every held-out prompt is at least data.max_length={max_length} "
                            "tokens long; raise data.max_length")
    tokens = [sum(min(s + 1, max_length) for s in seqs) for _, seqs in lengths]  # + the EOS TRL adds to answers
    longest = max(range(len(tokens)), key=tokens.__getitem__)
    report = DataReport(read, empty, dup, truncated, prompt_too_long, len(train_ds), len(eval_ds),
                        fmt + (", chat template" if conversational else ""), sources[longest] + 1, tokens[longest],
                        note)
    return train_ds, eval_ds, report


def shared_on_disk(train_ds, eval_ds, folder: Path, writer: bool):
    """The prepared splits written to `folder` by one process (`writer`) and read back from there by every rank.
    What a library caches beside a dataset goes where its files are: for TRL's precomputed reference log-probs
    that must be the run directory, which every rank (every node) reads, not a process's temporary folder."""
    import datasets

    if writer:
        for name, ds in (("train", train_ds), ("eval", eval_ds)):
            ds.save_to_disk(str(folder / name))
    # on disk even where HF_DATASETS_IN_MEMORY_MAX_SIZE would load it into memory: TRL's cache goes beside its files
    return tuple(datasets.load_from_disk(str(folder / name), keep_in_memory=False) for name in ("train", "eval"))
