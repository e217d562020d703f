"""Collators (padding sides, pad == eos) and packing (no token lost, rows isolated)."""

from __future__ import annotations

import copy

import torch

from chatforge.data import (
    IGNORE_INDEX,
    PairCollator,
    PromptCollator,
    SFTCollator,
    load_step_data,
    model_inputs,
)

from .conftest import numbered_rows, write_rows


def test_sft_collator_right_pads_and_keeps_eos_when_pad_is_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    rows = [
        {"input_ids": [7, 8, eos], "labels": [-100, 8, eos]},
        {"input_ids": [9, eos], "labels": [-100, eos]},
    ]
    batch = SFTCollator(tok)(rows)
    assert batch["input_ids"].tolist() == [[7, 8, eos], [9, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 8, eos], [-100, eos, -100]]
    assert "position_ids" not in batch and model_inputs(batch)["attention_mask"] is batch["attention_mask"]


def test_pair_and_prompt_collators(tokenizer):
    pad = tokenizer.pad_token_id
    rows = [
        {"chosen_input_ids": [1, 2, 3], "rejected_input_ids": [1, 2], "prompt_len": 1},
        {"chosen_input_ids": [4, 5], "rejected_input_ids": [4, 6, 7, 8], "prompt_len": 1},
    ]
    batch = PairCollator(tokenizer)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, pad], [4, 5, pad, pad], [1, 2, pad, pad], [4, 6, 7, 8]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    prompts = PromptCollator(tokenizer)([{"prompt_input_ids": [1, 2, 3]}, {"prompt_input_ids": [4]}])
    assert prompts["input_ids"].tolist() == [[1, 2, 3], [pad, pad, 4]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def _sft(tmp_path, make_cfg, tokenizer, packing: bool):
    path = write_rows(tmp_path / "rows.jsonl", numbered_rows(60))
    cfg = make_cfg(
        [path], data_split=[1, 0, 0], eval_fraction=0, max_prompt_length=16, max_length=48, packing=packing
    )
    return load_step_data(cfg, tokenizer, "sft")


def test_packing_loses_no_token_and_masks_boundaries(tmp_path, make_cfg, tokenizer):
    plain = _sft(tmp_path, make_cfg, tokenizer, packing=False).train
    packed = _sft(tmp_path, make_cfg, tokenizer, packing=True)
    lengths = [len(r["input_ids"]) for r in plain]
    expected_packs, fill = [], 0  # greedy in order: hand-computed from the unpacked lengths
    for n in lengths:
        if fill and fill + n > 48:
            expected_packs.append(fill)
            fill = 0
        fill += n
    expected_packs.append(fill)
    assert [len(r["input_ids"]) for r in packed.train] == expected_packs and len(expected_packs) < len(
        lengths
    )
    assert packed.stats["train_sequences"] == 60 and packed.stats["train_rows"] == len(expected_packs)
    assert sum((r["input_ids"] for r in packed.train), []) == sum((r["input_ids"] for r in plain), [])
    starts = {sum(lengths[:i]) for i in range(len(lengths))}
    flat_labels = sum((r["labels"] for r in packed.train), [])
    want = [IGNORE_INDEX if i in starts else x for i, x in enumerate(sum((r["labels"] for r in plain), []))]
    assert flat_labels == want
    positions = sum((r["position_ids"] for r in packed.train), [])
    assert positions == sum((list(range(n)) for n in lengths), [])


def test_packed_rows_do_not_attend_to_each_other(tmp_path, make_cfg, tokenizer, fixture_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir / "llama")).eval()
    packed = _sft(tmp_path, make_cfg, tokenizer, packing=True).train
    batch = SFTCollator(tokenizer)([packed[0], packed[1]])
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    row, real = batch["input_ids"][0], int(batch["attention_mask"][0].sum())
    starts = [i for i, p in enumerate(batch["position_ids"][0, :real].tolist()) if p == 0] + [real]
    assert len(starts) >= 3  # at least two packed rows in the first pack
    for a, b in zip(starts, starts[1:]):
        with torch.no_grad():
            alone = model(input_ids=row[None, a:b]).logits[0]
        torch.testing.assert_close(logits[0, a:b], alone, atol=1e-4, rtol=1e-4)
    b = starts[1]  # sanity: with a plain 2D mask the second row does see the first, so the check has teeth
    assert not torch.allclose(leaky[0, b : starts[2]], logits[0, b : starts[2]], atol=1e-4)
