from __future__ import annotations

import numpy as np
import pytest

from chatforge.data import DataError, DatasetSpec, parse_spec
from chatforge.data.split import split_bounds, step_part, train_eval, weighted_indices


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a.jsonl", DatasetSpec("a.jsonl")),
        ("a.jsonl:3", DatasetSpec("a.jsonl", weight=3.0)),
        ("data/x:y.jsonl:2.5:sft", DatasetSpec("data/x:y.jsonl", weight=2.5, role="sft")),
        ("data/x:y.jsonl", DatasetSpec("data/x:y.jsonl")),
        ("org/ds:split=test:0.5:prompts", DatasetSpec("org/ds", weight=0.5, role="prompts", split="test")),
        ("org/ds:format=hh", DatasetSpec("org/ds", format="hh")),
        ("a:b:1:2", DatasetSpec("a:b:1", weight=2.0)),  # only the last number is a weight
    ],
)
def test_parse_spec(text, expected):
    assert parse_spec(text) == expected


def test_existing_path_with_colon_is_never_split(tmp_path):
    path = tmp_path / "rows:3"
    path.write_text("{}")
    assert parse_spec(str(path)) == DatasetSpec(str(path))


@pytest.mark.parametrize("text", ["a.jsonl:0", "a.jsonl:-1", "a.jsonl:inf", " "])
def test_bad_spec(text):
    with pytest.raises(DataError, match="Fix:"):
        parse_spec(text)


def test_split_parts_are_disjoint_deterministic_and_follow_ratios():
    assert split_bounds(100, [2, 4, 4]) == [0, 20, 60, 100]
    parts = {s: step_part(100, [2, 4, 4], "all", s, seed=7) for s in ("sft", "reward", "ppo")}
    assert [len(p) for p in parts.values()] == [20, 40, 40]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(100))
    assert all(np.array_equal(p, step_part(100, [2, 4, 4], "all", s, seed=7)) for s, p in parts.items())
    assert not np.array_equal(parts["sft"], step_part(100, [2, 4, 4], "all", "sft", seed=8))
    train, evals = train_eval(parts["reward"], 0.1)
    assert (len(train), len(evals)) == (36, 4) and set(train).isdisjoint(evals)


def test_roles_give_all_rows_to_their_step():
    assert len(step_part(10, [2, 4, 4], "sft", "sft", 0)) == 10
    assert len(step_part(10, [2, 4, 4], "sft", "ppo", 0)) == 0
    assert len(step_part(10, [2, 4, 4], "prompts", "ppo", 0)) == 10
    assert len(step_part(10, [2, 4, 4], "prompts", "ptx", 0)) == 10


def test_weighted_indices():
    idx = weighted_indices(10, 2.5, seed=0)
    counts = np.bincount(idx, minlength=10)
    assert len(idx) == 25 and counts.min() == 2 and counts.max() == 3 and (counts == 3).sum() == 5
    assert len(weighted_indices(10, 0.3, seed=0)) == 3
    assert np.array_equal(weighted_indices(10, 0.3, seed=0), weighted_indices(10, 0.3, seed=0))
