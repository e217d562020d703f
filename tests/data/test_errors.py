"""Malformed inputs: each gives one DataError naming the file, the row and field where known, and a fix."""

from __future__ import annotations

import pytest

from chatforge.data import DataError, load_step_data

from .conftest import write_rows


def _text(path, content: str) -> str:
    path.write_text(content)
    return str(path)


def _arrow_dict(path) -> str:
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "hi"}])}).save_to_disk(str(path))
    return str(path)


CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
# name -> (make the file(s) under tmp_path, spec suffix, step, message fragments in order)
CASES = {
    "missing file": (
        lambda d: str(d / "nope.jsonl"),
        "",
        "sft",
        ["nope.jsonl", "no such file", "Fix: check the path"],
    ),
    "unsupported type": (
        lambda d: _text(d / "rows.txt", "hi"),
        "",
        "sft",
        ["rows.txt", "unsupported file type '.txt'", "Fix:"],
    ),
    "empty file": (lambda d: _text(d / "e.jsonl", ""), "", "sft", ["e.jsonl", "empty", "Fix:"]),
    "empty json array": (lambda d: _text(d / "e.json", "[]"), "", "sft", ["e.json", "no rows", "Fix:"]),
    "bad json line": (
        lambda d: _text(d / "b.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a",}\n'),
        "",
        "sft",
        ["b.jsonl, row 2", "invalid JSON", "Fix:"],
    ),
    "corrupt parquet": (
        lambda d: _text(d / "c.parquet", "not parquet"),
        "",
        "sft",
        ["c.parquet", "cannot read it as parquet", "Fix:"],
    ),
    "unknown columns": (
        lambda d: write_rows(d / "q.jsonl", [{"question": "a", "answer": "b"}]),
        "",
        "sft",
        [
            "q.jsonl",
            "cannot detect the row format",
            "['answer', 'question']",
            "Fix: rename columns with data.columns",
        ],
    ),
    "forced format lacks column": (
        lambda d: write_rows(d / "s.jsonl", [{"prompt": "a", "completion": "b"}]),
        ":format=hh",
        "sft",
        ["s.jsonl", "format 'hh' needs the column(s) chosen+rejected", "Fix:"],
    ),
    "unknown format": (
        lambda d: write_rows(d / "s.jsonl", [{"prompt": "a", "completion": "b"}]),
        ":format=alpaca",
        "sft",
        ["s.jsonl", "unknown format 'alpaca'", "Fix: use 'auto' or one of"],
    ),
    "wrong type": (
        lambda d: write_rows(
            d / "w.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": 3, "completion": "c"}]
        ),
        "",
        "sft",
        ["w.jsonl, row 2, field 'prompt'", "expected a string or a list of messages, got int", "Fix:"],
    ),
    "message without content": (
        lambda d: write_rows(d / "m.jsonl", [{"messages": CONV}, {"messages": [{"role": "user"}]}]),
        "",
        "sft",
        ["m.jsonl, row 2, field 'messages[0]'", "not a {role, content} message", "Fix: give each message"],
    ),
    "unknown role": (
        lambda d: write_rows(d / "r.jsonl", [{"messages": [{"role": "bot", "content": "x"}, CONV[1]]}]),
        "",
        "sft",
        ["r.jsonl, row 1, field 'messages[0].role'", "unknown role 'bot'", "Fix: use one of system"],
    ),
    "transcript without turns": (
        lambda d: write_rows(d / "h.jsonl", [{"chosen": "just text", "rejected": "more text"}]),
        "",
        "reward",
        ["h.jsonl, row 1, field 'chosen'", "no 'Human:'/'Assistant:' turn", "Fix:"],
    ),
    "pair not ending with reply": (
        lambda d: write_rows(d / "u.jsonl", [{"chosen": CONV[:1], "rejected": CONV}]),
        "",
        "reward",
        ["u.jsonl, row 1, field 'chosen'", "does not end with an assistant message", "Fix:"],
    ),
    "pair with different prompts": (
        lambda d: write_rows(
            d / "u.jsonl", [{"chosen": CONV, "rejected": [{"role": "user", "content": "ho"}, CONV[1]]}]
        ),
        "",
        "reward",
        ["u.jsonl, row 1, field 'chosen'", "different conversations", "Fix:"],
    ),
    "missing reply for sft": (
        lambda d: write_rows(
            d / "n.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]
        ),
        "",
        "sft",
        ["n.jsonl, row 2, field 'completion'", "no completion", "Fix:"],
    ),
    "step not servable": (
        lambda d: write_rows(d / "s.jsonl", [{"prompt": "a", "completion": "b"}]),
        "",
        "reward",
        ["s.jsonl (format 'standard'", "cannot serve step 'reward'", "Fix: mark it ':sft'"],
    ),
    "arrow dict without split": (
        lambda d: _arrow_dict(d / "dd"),
        "",
        "ppo",
        ["dd", "no split 'train'", "Fix: add ':split=NAME'"],
    ),
    "plain dir": (
        lambda d: str((d / "plain").mkdir() or d / "plain"),
        "",
        "sft",
        ["plain", "not an Arrow dir", "Fix:"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_gives_one_clear_error(case, tmp_path, make_cfg, tokenizer):
    make, suffix, step, fragments = CASES[case]
    path = make(tmp_path)
    cfg = make_cfg([path + suffix], data_split=[1, 1, 1], eval_fraction=0)
    with pytest.raises(DataError) as info:
        load_step_data(cfg, tokenizer, step)
    message = str(info.value)
    positions = [message.find(f) for f in fragments]
    assert -1 not in positions and positions == sorted(positions), message
