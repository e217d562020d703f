"""Every format adapter, in every file container, gives the hand-written unified row."""

from __future__ import annotations

import pytest

from chatforge.data.pipeline import load_unified

from .conftest import write_rows


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


U, A, S = (lambda c: msg("user", c)), (lambda c: msg("assistant", c)), (lambda c: msg("system", c))
HH_PREFIX = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant:"

CASES = {
    "dschat": (
        "rows.jsonl",
        {
            "prompt": "\n\nHuman: What is 2 + 2?\n\nAssistant:",
            "response": " 4",
            "chosen": " 4",
            "rejected": " 5",
        },
        {"prompt": [U("What is 2 + 2?")], "completion": [A("4")], "chosen": [A("4")], "rejected": [A("5")]},
    ),
    "hh": (
        "rows.json",
        {"chosen": HH_PREFIX + " 4", "rejected": HH_PREFIX + " 5"},
        {"prompt": [U("Hi"), A("Hello!"), U("What is 2 + 2?")], "chosen": [A("4")], "rejected": [A("5")]},
    ),
    "conversational": (
        "rows.parquet",
        {"messages": [S("Be brief."), U("2 + 2?"), A("4")]},
        {"prompt": [S("Be brief."), U("2 + 2?")], "completion": [A("4")]},
    ),
    "conversational-implicit": (  # UltraFeedback-binarized: chosen/rejected hold the whole conversation
        "uf",
        {"prompt": "2 + 2?", "chosen": [U("2 + 2?"), A("4")], "rejected": [U("2 + 2?"), A("5")]},
        {"prompt": [U("2 + 2?")], "chosen": [A("4")], "rejected": [A("5")]},
    ),
    "conversational-explicit": (
        "rows.jsonl",
        {"prompt": [U("2 + 2?")], "chosen": [A("4")], "rejected": [A("5")]},
        {"prompt": [U("2 + 2?")], "chosen": [A("4")], "rejected": [A("5")]},
    ),
    "standard": (
        "rows.csv",
        {"prompt": "2 + 2?", "completion": "4"},
        {"prompt": [U("2 + 2?")], "completion": [A("4")]},
    ),
    "standard-pairs": (
        "rows.parquet",
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [U("2 + 2?")], "chosen": [A("4")], "rejected": [A("5")]},
    ),
    "standard-prompt-only": ("arrow", {"prompt": "2 + 2?"}, {"prompt": [U("2 + 2?")]}),
    "text": ("rows.csv", {"text": "Once upon a time."}, {"text": "Once upon a time."}),
}
EXPECTED_FORMAT = {"conversational-implicit": "conversational", "conversational-explicit": "conversational"}


@pytest.mark.parametrize("case", list(CASES))
def test_format_adapters(case, tmp_path, make_cfg):
    name, row, expected = CASES[case]
    path = write_rows(tmp_path / name, [row, row])
    unified, fmt = load_unified(path, make_cfg([path]))
    assert fmt == EXPECTED_FORMAT.get(case, case.split("-")[0])
    full = {
        "prompt": [],
        "completion": [],
        "chosen": [],
        "rejected": [],
        "text": "",
        "extra": "{}",
        **expected,
    }
    assert unified[1] == {**full, "row": 2}


def test_column_mapping_and_forced_format(tmp_path, make_cfg):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "2 + 2?", "answer": "4"}])
    unified, fmt = load_unified(
        path, make_cfg([path], columns={"question": "prompt", "answer": "completion"})
    )
    assert fmt == "standard" and unified[0]["completion"] == [A("4")]
    # A DS-Chat transcript read as TRL standard stays one verbatim user message.
    path = write_rows(tmp_path / "ds.jsonl", [{"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "yo"}])
    unified, fmt = load_unified(f"{path}:format=standard", make_cfg([path]))
    assert fmt == "standard" and unified[0]["prompt"] == [U("\n\nHuman: hi\n\nAssistant:")]


def test_transcript_with_system_turn_and_multi_turn_prompt(tmp_path, make_cfg):
    prompt = "System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 1 + 1?\n\nAssistant:"
    path = write_rows(tmp_path / "r.jsonl", [{"prompt": prompt, "response": "2"}])
    unified, fmt = load_unified(path, make_cfg([path]))
    assert fmt == "dschat"
    assert unified[0]["prompt"] == [S("Be brief."), U("Hi"), A("Hello"), U("1 + 1?")]


def test_other_scalar_columns_travel_as_extra(tmp_path, make_cfg):
    """Columns no format reads (a reference answer, an id) reach reward functions through `extra`."""
    import json

    rows = [{"prompt": "2 + 2?", "answer": "4", "id": 7, "tags": ["a"]}]
    path = write_rows(tmp_path / "qa.jsonl", rows)
    unified, _ = load_unified(path, make_cfg([path]))
    assert json.loads(unified[0]["extra"]) == {"answer": "4", "id": 7}  # lists are not scalars


def test_a_row_of_another_format_in_the_same_file_is_named(tmp_path, make_cfg):
    from chatforge.data import DataError

    rows = [
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "yo", "messages": None},
        {"prompt": "\n\nHuman: 1+1?\n\nAssistant:", "response": "2", "messages": None},
        {"prompt": None, "response": None, "messages": [U("hi"), A("yo")]},
    ]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(
        DataError, match=r"mixed.jsonl, row 3: this row looks like format 'conversational'.*'dschat'"
    ):
        load_unified(path, make_cfg([path]))
    # Forcing a format on the spec means the user chose: no per-row detection.
    load_unified(f"{path}:format=dschat", make_cfg([path]))
