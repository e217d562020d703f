"""load_step_data end to end: step splits, blending, loss masks, truncation, PTX chunks, cache."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from chatforge.data import IGNORE_INDEX, ChatRenderer, DataError, load_step_data

from .conftest import numbered_rows, write_rows


def prompt_tags(tokenizer, data, step: str) -> list[str]:
    """The 'q17'-style tag of every row of a step dataset (train then eval)."""
    key = {"sft": "input_ids", "reward": "chosen_input_ids", "ppo": "prompt_input_ids"}[step]
    texts = [tokenizer.decode(r[key]) for part in (data.train, data.eval) for r in part]
    return [re.search(r"[a-z]\d+", t).group() for t in texts]


def test_step_splits_are_disjoint_sized_and_deterministic(tmp_path, make_cfg, tokenizer):
    path = write_rows(tmp_path / "rows.jsonl", numbered_rows(200))
    cfg = make_cfg([path], eval_fraction=0.1)
    data = {s: load_step_data(cfg, tokenizer, s) for s in ("sft", "reward", "ppo")}
    sizes = {s: (len(d.train), len(d.eval)) for s, d in data.items()}
    assert sizes == {"sft": (36, 4), "reward": (72, 8), "ppo": (72, 8)}
    tags = {s: prompt_tags(tokenizer, d, s) for s, d in data.items()}
    assert sorted(tags["sft"] + tags["reward"] + tags["ppo"], key=lambda t: int(t[1:])) == [
        f"q{i}" for i in range(200)
    ]
    again = load_step_data(
        make_cfg([path], eval_fraction=0.1, cache_dir=str(tmp_path / "other")), tokenizer, "reward"
    )
    assert not again.stats["cache_hit"] and again.train.to_dict() == data["reward"].train.to_dict()


def test_blending_weights_and_roles(tmp_path, make_cfg, tokenizer):
    a = write_rows(tmp_path / "a.jsonl", numbered_rows(40, "a"))
    b = write_rows(tmp_path / "b.parquet", numbered_rows(40, "b"))
    c = write_rows(tmp_path / "c.jsonl", numbered_rows(10, "c"))
    cfg = make_cfg([f"{a}:1:prompts", f"{b}:2.5:prompts", f"{c}:sft"], eval_fraction=0)
    data = load_step_data(cfg, tokenizer, "ppo")
    counts = Counter(prompt_tags(tokenizer, data, "ppo"))
    assert len(data.train) == 40 + 100
    assert (
        sum(v for k, v in counts.items() if k[0] == "a") == 40
        and max(counts[f"a{i}"] for i in range(40)) == 1
    )
    assert (
        sum(v for k, v in counts.items() if k[0] == "b") == 100
        and min(counts[f"b{i}"] for i in range(40)) == 2
    )
    assert data.stats["sources"][c]["skipped"] == "marked ':sft'"
    sft = load_step_data(cfg, tokenizer, "sft")  # only c serves SFT, with all its rows
    assert len(sft.train) == 10 and set(prompt_tags(tokenizer, sft, "sft")) == {f"c{i}" for i in range(10)}


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "Thank you."},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_sft_loss_mask_covers_assistant_tokens_only(tmp_path, make_cfg, tokenizer, loss_on):
    path = write_rows(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    row = load_step_data(
        make_cfg([path], data_split=[1, 0, 0], eval_fraction=0, loss_on=loss_on), tokenizer, "sft"
    ).train[0]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    if loss_on == "all":
        assert row["labels"] == row["input_ids"]
        return
    kept = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(row["input_ids"], row["labels"]))
    assert tokenizer.decode(kept) == "The answer is 5.<|end|>You are welcome.<|end|>"


def test_sft_truncation_policy_and_counts(tmp_path, make_cfg, tokenizer):
    long = " ".join(str(i) for i in range(40))
    rows = [
        {"prompt": "1 + 2?", "completion": "3"},
        {"prompt": long, "completion": "ok"},
        {"prompt": "hi", "completion": long},
    ]
    path = write_rows(tmp_path / "t.jsonl", rows)
    cfg = make_cfg([path], data_split=[1, 0, 0], eval_fraction=0, max_prompt_length=12, max_length=24)
    data = load_step_data(cfg, tokenizer, "sft")
    assert data.stats["truncated"] == {"prompt": 1, "response": 1} and data.stats["dropped"] == {}
    r = ChatRenderer(tokenizer)

    def parts(row):
        prompt = [{"role": "user", "content": row["prompt"]}]
        return r.prompt_ids(prompt), r.reply_ids(
            prompt, [{"role": "assistant", "content": row["completion"]}]
        )

    (p0, c0), (p1, c1), (p2, c2) = (parts(x) for x in rows)
    assert len(p1) > 12 and len(p2) + len(c2) > 24
    expected = {tuple(p0 + c0), tuple(p1[-12:] + c1), tuple((p2 + c2)[:24])}
    assert {tuple(x["input_ids"]) for x in data.train} == expected


def test_reward_rows_truncation_and_drops(tmp_path, make_cfg, tokenizer):
    long = " ".join(str(i) for i in range(30))
    rows = [
        {"prompt": "1 + 2?", "chosen": "3", "rejected": "4"},
        {"prompt": "1 + 1?", "chosen": "2", "rejected": "2"},  # identical pair
        {"prompt": "2 + 2?", "chosen": long + " A", "rejected": long + " B"},  # identical once truncated
    ]
    path = write_rows(tmp_path / "p.jsonl", rows)
    cfg = make_cfg([path], data_split=[0, 1, 0], eval_fraction=0, max_prompt_length=12, max_length=24)
    data = load_step_data(cfg, tokenizer, "reward")
    assert data.stats["dropped"] == {"identical_pair": 1, "identical_after_truncation": 1}
    assert data.stats["truncated"] == {"response": 1}
    (row,) = data.train
    r = ChatRenderer(tokenizer)
    prompt = r.prompt_ids([{"role": "user", "content": "1 + 2?"}])
    assert row["prompt_len"] == len(prompt) and row["chosen_input_ids"][: len(prompt)] == prompt
    assert tokenizer.decode(row["chosen_input_ids"][len(prompt) :]) == "3<|end|>"
    assert tokenizer.decode(row["rejected_input_ids"][len(prompt) :]) == "4<|end|>"


def test_ppo_prompts_end_with_generation_prompt_and_are_left_truncated(tmp_path, make_cfg, tokenizer):
    long = " ".join(str(i) for i in range(40))
    path = write_rows(tmp_path / "p.csv", [{"prompt": "1 + 2?"}, {"prompt": long}])
    data = load_step_data(
        make_cfg([path], data_split=[0, 0, 1], eval_fraction=0, max_prompt_length=10), tokenizer, "ppo"
    )
    got = sorted((tokenizer.decode(x["prompt_input_ids"]) for x in data.train), key=len)
    assert got[0] == "<|bos|><|user|>1 + 2?<|end|><|assistant|>"
    full = ChatRenderer(tokenizer).prompt_ids([{"role": "user", "content": long}])
    assert tokenizer.decode(full[-10:]) == got[1] and data.stats["truncated"] == {"prompt": 1}


def test_ptx_chunks_long_text_without_losing_tokens(tmp_path, make_cfg, tokenizer):
    text = " ".join(str(i) for i in range(50))
    path = write_rows(tmp_path / "t.jsonl", [{"text": text}])
    data = load_step_data(
        make_cfg([path], eval_fraction=0, max_length=16, max_prompt_length=8), tokenizer, "ptx"
    )
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    chunks = sorted((x["input_ids"] for x in data.train), key=lambda c: ids.index(c[0]) if c else 0)
    assert [len(c) for c in chunks] == [16] * (len(ids) // 16) + ([len(ids) % 16] if len(ids) % 16 else [])
    assert sum(chunks, []) == ids and all(x["labels"] == x["input_ids"] for x in data.train)


def test_cache_hit_on_second_run_and_invalidation(tmp_path, make_cfg, tokenizer):
    from chatforge.data import pipeline

    path = write_rows(tmp_path / "rows.jsonl", numbered_rows(30))
    cfg = make_cfg([path])
    first = load_step_data(cfg, tokenizer, "sft")
    second = load_step_data(cfg, tokenizer, "sft")
    assert (first.stats["cache_hit"], second.stats["cache_hit"]) == (False, True)
    assert second.train.to_dict() == first.train.to_dict()
    assert second.train.cache_files[0]["filename"].startswith(
        second.stats["cache_path"]
    )  # memory-mapped Arrow
    # Another rank publishing first is not an error, and leaves no temp dir behind.
    final = tmp_path / "cache" / pipeline.cache_key(cfg, [pipeline.parse_spec(path)], tokenizer, "sft")
    pipeline._build_and_publish(cfg, [pipeline.parse_spec(path)], tokenizer, "sft", final.parent, final)
    assert not [p for p in final.parent.iterdir() if ".tmp-" in p.name]
    write_rows(tmp_path / "rows.jsonl", numbered_rows(31))
    third = load_step_data(cfg, tokenizer, "sft")
    assert not third.stats["cache_hit"] and third.stats["sources"][path]["rows"] == 31
    other_settings = load_step_data(make_cfg([path], max_prompt_length=64, max_length=100), tokenizer, "sft")
    assert not other_settings.stats["cache_hit"]


def test_no_chat_template_warns_and_uses_fallback(tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.warns(UserWarning, match="no chat template"):
        r = ChatRenderer(bare)
    ids, mask = r.conversation(CONVERSATION[1:3])
    assert bare.decode(ids) == "\n\nHuman: What is 2 + 3?\n\nAssistant: The answer is 5.<|end|>"
    assert bare.decode([t for t, m in zip(ids, mask) if m]) == " The answer is 5.<|end|>"


def test_empty_training_split_is_a_clear_error(tmp_path, make_cfg, tokenizer):
    path = write_rows(tmp_path / "rows.jsonl", numbered_rows(5))
    with pytest.raises(DataError, match="no training rows for step 'sft'.*data_split"):
        load_step_data(make_cfg([path], data_split=[0, 1, 1]), tokenizer, "sft")
