"""Data: every supported format, the counts reported, and errors that name the file and the column."""
import json
import os

import pytest

from launcher import ROOT
from launcher.data import DataError, prepare


def data_cfg(path, **kw):
    return {"path": str(path), "split": "train", "test_split": "test", "test_fraction": 0.2, "max_length": 64,
            "max_rows": None, "conversational": "auto", **kw}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_shipped_preference_data_counts(tiny_tokenizer):
    train, held_out, report = prepare(data_cfg(ROOT / "launcher/assets/demo_pref.jsonl", max_length=256), "dpo",
                                      tiny_tokenizer, 0)
    assert report.rows_read == 428 and report.dropped_duplicate == 6 and report.dropped_empty == 0
    assert report.train_rows + report.eval_rows == 422 == len(train) + len(held_out)
    assert train[0]["prompt"][0]["role"] == "user"  # strings became a conversation for the chat template


def test_drops_empty_and_duplicate_and_counts_truncated(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "yes " * (50 if i == 0 else 1), "rejected": "no"} for i in range(10)]
    rows += [{"prompt": "q1", "chosen": "yes ", "rejected": "no"}, {"prompt": "q", "chosen": "", "rejected": "no"}]
    _, _, report = prepare(data_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), "dpo", tiny_tokenizer, 0)
    assert (report.rows_read, report.dropped_empty, report.dropped_duplicate) == (12, 1, 1)
    assert report.truncated == 1


@pytest.mark.parametrize("row,expected_keys", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "text_id": "x"},
     {"messages"}),
    ({"prompt": "hi", "completion": "hello"}, {"prompt", "completion"}),
    ({"instruction": "say hi", "input": "", "output": "hello"}, {"prompt", "completion"}),
    ({"text": "plain text row"}, {"text"}),
])
def test_sft_formats(tmp_path, tiny_tokenizer, row, expected_keys):
    rows = [dict(row, **{k: (v + str(i) if isinstance(v, str) and v else v) for k, v in row.items()}) for i in range(10)]
    for i, r in enumerate(rows):
        if "messages" in r:
            r["messages"] = [dict(m, content=m["content"] + str(i)) for m in r["messages"]]
    train, _, report = prepare(data_cfg(write_jsonl(tmp_path / "s.jsonl", rows)), "sft", tiny_tokenizer, 0)
    assert set(train.column_names) == expected_keys
    assert report.train_rows == 8


def test_test_split_of_a_folder_is_used(tmp_path, tiny_tokenizer):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": f"p{i}", "completion": "c"} for i in range(6)])
    write_jsonl(tmp_path / "d" / "test.jsonl", [{"prompt": f"t{i}", "completion": "c"} for i in range(3)])
    _, held_out, _ = prepare(data_cfg(tmp_path / "d"), "sft", tiny_tokenizer, 0)
    assert len(held_out) == 3


def test_missing_column_names_file_and_column(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p.jsonl: DPO needs columns prompt, chosen, rejected; missing rejected"):
        prepare(data_cfg(path), "dpo", tiny_tokenizer, 0)


def test_empty_dataset(tmp_path, tiny_tokenizer):
    (tmp_path / "e.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match="e.csv"):
        prepare(data_cfg(tmp_path / "e.csv"), "sft", tiny_tokenizer, 0)


def test_corrupt_json_line_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    with pytest.raises(DataError, match=r"bad.jsonl.*Line 2 is not valid JSON"):
        prepare(data_cfg(path), "sft", tiny_tokenizer, 0)


def test_a_folder_whose_files_differ_names_both_files_and_their_columns(tmp_path, tiny_tokenizer):
    """A folder is read as one dataset: files of other columns, or a bad line in one of them, are named."""
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a_pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 3)
    write_jsonl(tmp_path / "d" / "b_sft.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    with pytest.raises(DataError, match=r"columns differ: b_sft.jsonl has prompt, completion; a_pairs.jsonl has "
                                        r"prompt, chosen, rejected\. Give data.path one file"):
        prepare(data_cfg(tmp_path / "d"), "dpo", tiny_tokenizer, 0)
    (tmp_path / "d" / "b_sft.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"b_sft.jsonl: Line 2 is not valid JSON"):
        prepare(data_cfg(tmp_path / "d"), "dpo", tiny_tokenizer, 0)


def test_a_line_that_is_not_utf8_is_named_with_its_byte(tmp_path, tiny_tokenizer):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}).encode() + b"\n"
    path.write_bytes(good * 4 + b'{"prompt": "caf\xe9?", "chosen": "a", "rejected": "b"}\n' + good)
    with pytest.raises(DataError, match=r"latin1.jsonl: line 5 of latin1.jsonl is not UTF-8 \(byte 0xe9 at byte 16 "
                                        r"of the line\)\. Save it as UTF-8"):
        prepare(data_cfg(path), "dpo", tiny_tokenizer, 0)


def test_file_that_is_not_what_its_name_says(tmp_path, tiny_tokenizer):
    path = tmp_path / "data.parquet"
    path.write_text("this is not parquet")
    with pytest.raises(DataError, match=r"data.parquet: cannot be read as .parquet"):
        prepare(data_cfg(path), "sft", tiny_tokenizer, 0)


def test_conversations_without_chat_template_name_the_key(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="model.chat_template"):
        prepare(data_cfg(path), "sft", tok, 0)


def test_preference_conversations_with_an_implicit_prompt(tmp_path, tiny_tokenizer):
    rows = [{"chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "good"}],
             "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "bad"}]}
            for i in range(10)]
    train, _, report = prepare(data_cfg(write_jsonl(tmp_path / "c.jsonl", rows)), "dpo", tiny_tokenizer, 0)
    assert set(train.column_names) == {"chosen", "rejected"} and report.train_rows == 8


@pytest.mark.parametrize("bad, words", [
    ({"chosen": 42}, "line 4: column 'chosen' holds int '42', not text"),
    ({"rejected": {"text": "no"}}, "line 4: column 'rejected' holds dict"),
    ({"prompt": [{"from": "human", "value": "hi"}]}, "line 4: column 'prompt' holds a message without 'role' and "
                                                      "'content' (['from', 'value']; ShareGPT's 'from'/'value'"),
])
def test_a_value_that_is_not_text_is_named_with_its_line(tmp_path, tiny_tokenizer, bad, words):
    """TRL would stop in the ranks on these (or pyarrow before them); a report drawn after training would fail."""
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(10)]
    rows[3] = dict(rows[3], **bad)
    with pytest.raises(DataError, match="p.jsonl, " + words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        prepare(data_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), "dpo", tiny_tokenizer, 0)


def test_pairs_with_the_same_two_answers_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "yes" if i < 3 else "no"} for i in range(10)]
    _, _, report = prepare(data_cfg(write_jsonl(tmp_path / "p.jsonl", rows)), "dpo", tiny_tokenizer, 0)
    assert report.train_rows + report.eval_rows == 7 and report.dropped_duplicate == 3
    same = [{"prompt": f"q{i}", "chosen": "a", "rejected": "a"} for i in range(5)]
    with pytest.raises(DataError, match="no usable rows in train after dropping empty ones and 5 whose chosen and "
                                        "rejected are the same"):
        prepare(data_cfg(write_jsonl(tmp_path / "same.jsonl", same)), "dpo", tiny_tokenizer, 0)


def test_conversations_without_an_assistant_turn_are_refused(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "human", "content": f"hi {i}"}, {"role": "bot", "content": "hello"}]}
            for i in range(10)]
    with pytest.raises(DataError, match=r"line 1: no message has role 'assistant' \(roles \['bot', 'human'\]\)"):
        prepare(data_cfg(write_jsonl(tmp_path / "m.jsonl", rows)), "sft", tiny_tokenizer, 0)


def test_a_datasets_cache_that_cannot_be_used_is_not_blamed_on_the_data(tmp_path):
    """HF_HOME or HF_DATASETS_CACHE under a file (or unwritable): the message said to check the data file's format."""
    import subprocess
    import sys

    (tmp_path / "afile").write_text("x")
    script = ("from launcher.data import read_dataset, DataError\n"
              "try:\n    read_dataset('launcher/assets/demo_pref.jsonl', 'train', 'test')\n"
              "except DataError as err:\n    print(err)\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "afile" / "datasets")})
    assert "the datasets cache cannot be used (Not a directory: " in res.stdout, res.stdout + res.stderr[-2000:]
    assert "point HF_DATASETS_CACHE (or HF_HOME) at a folder this user can write" in res.stdout
