"""Dropping finished rows from the computed batch changes nothing in the outputs."""

from __future__ import annotations

import pytest
import torch

from chatforge.config.schema import GenerationConfig
from chatforge.fixtures import FAMILIES
from chatforge.generation import engine, generate

from .scripted import ScriptedLM, one_hot_script

PAD, EOS = 0, 1
THRESHOLDS = [0.0, 0.75, 1.0]  # never, the default, as soon as one row stops


def _same_outputs(a, b, logprob_atol: float = 0.0) -> None:
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.finished, b.finished)
    assert torch.allclose(a.logprobs, b.logprobs, rtol=0.0, atol=logprob_atol)


@pytest.fixture
def compactions(monkeypatch) -> list[int]:
    """Batch sizes left after each compaction."""
    sizes: list[int] = []
    original = engine._compact

    def spy(state):
        original(state)
        sizes.append(state.rows.shape[0])

    monkeypatch.setattr(engine, "_compact", spy)
    return sizes


def test_scripted_rows_read_their_own_script_after_compaction(compactions):
    rows = [[5, EOS, 9, 9, 9, 9], [5, 6, 7, 8, 9, 10], [EOS, 9, 9, 9, 9, 9], [6, 6, 6, EOS, 9, 9]]
    ids, mask = torch.full((4, 3), 4), torch.ones(4, 3, dtype=torch.long)
    config = GenerationConfig(max_new_tokens=6, do_sample=False)
    outs, sizes = {}, {}
    for threshold in THRESHOLDS:
        model = ScriptedLM(one_hot_script(rows))
        outs[threshold] = generate(
            model, ids, mask, config, eos_token_id=EOS, pad_token_id=PAD, compact_threshold=threshold
        )
        sizes[threshold] = list(compactions)
        compactions.clear()
        if threshold == 1.0:
            # Row 2 stops first, then 0, then 3: the model saw ever fewer rows, each the right one.
            assert model.seen_rows == [[0, 1, 2, 3], [0, 1, 3], [1, 3], [1, 3], [1], [1]]
    # 0.75: 3 of 4 alive is not below 3/4; 2 of 4 is, then 1 of 2.
    assert sizes == {0.0: [], 0.75: [2, 1], 1.0: [3, 2, 1]}
    assert outs[0.0].sequences[:, 3:].tolist() == [
        [5, EOS, PAD, PAD, PAD, PAD],
        [5, 6, 7, 8, 9, 10],
        [EOS, PAD, PAD, PAD, PAD, PAD],
        [6, 6, 6, EOS, PAD, PAD],
    ]
    for threshold in THRESHOLDS[1:]:
        _same_outputs(outs[0.0], outs[threshold])


def test_compaction_keeps_penalty_stop_checker_and_positions_per_row():
    rows = [[5, EOS, 9, 9, 9], [6, 7, 8, 9, 9], [5, 5, 5, 5, 5], [EOS, 9, 9, 9, 9]]
    ids, mask = torch.full((4, 3), 4), torch.ones(4, 3, dtype=torch.long)
    ids[2, 0], mask[2, 0] = PAD, 0  # a left-padded row survives the compaction

    def stop_after_7_8(generated: list[int]) -> bool:
        return generated[-2:] == [7, 8]

    config = GenerationConfig(max_new_tokens=5, do_sample=False, repetition_penalty=1.3)
    outs, models = {}, {}
    for threshold in (0.0, 1.0):
        models[threshold] = ScriptedLM(one_hot_script(rows, peak=3.0))
        outs[threshold] = generate(
            models[threshold], ids, mask, config, eos_token_id=EOS, pad_token_id=PAD,
            stop_checker=stop_after_7_8, compact_threshold=threshold,
        )  # fmt: skip
    _same_outputs(outs[0.0], outs[1.0])
    assert outs[1.0].finished.tolist() == [True, True, False, True]
    # Row 2's positions continue from its own prompt length after the other rows were dropped.
    kept = models[1.0].seen_rows[-1].index(2)
    assert models[1.0].seen_positions[-1][kept].tolist() == [1 + 4]


@pytest.fixture(scope="module")
def models(fixture_dir):
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(str(fixture_dir / f)) for f in FAMILIES}


def _stop_ids_at_varied_steps(model, ids, mask, config, tokenizer, seed) -> list[int]:
    """One or two token ids that, used as EOS ids, make the rows stop after the most varied lengths.

    Found from a reference run without EOS: a row stops at the first step that produces one of them.
    """
    out = generate(
        model, ids, mask, config, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(seed), compact_threshold=0.0,
    )  # fmt: skip
    response = out.sequences[:, ids.shape[1] :]
    steps = response.shape[1]
    first = {}  # token -> (B,) first step producing it in each row (steps = never)
    for token in response.unique().tolist():
        hit = response == token
        first[token] = torch.where(hit.any(1), hit.float().argmax(1), torch.tensor(float(steps)))
    candidates = [[t] for t in first] + [[a, b] for a in first for b in first if a < b]

    def spread(ids_: list[int]) -> int:
        stop = torch.stack([first[t] for t in ids_]).amin(0)
        return len(set(stop.tolist()))

    return max(candidates, key=spread)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded-sample"])
def test_compacted_equals_uncompacted_on_fixture_models(family, do_sample, models, tokenizer, compactions):
    prompts = ["What is 12 + 7?", "Hi", "Tell me a story about a cat.", "x", "2 + 2 =", "Hello there!"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = enc.input_ids, enc.attention_mask
    # The penalty keeps the tiny random models from repeating one token, so stop ids occur at varied steps.
    config = GenerationConfig(
        max_new_tokens=14, do_sample=do_sample, temperature=0.9, top_k=50, repetition_penalty=3.0
    )
    model = models[family]
    stop_ids = _stop_ids_at_varied_steps(model, ids, mask, config, tokenizer, seed=4)
    outs = {
        threshold: generate(
            model,
            ids,
            mask,
            config,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
            generator=torch.Generator().manual_seed(4),
            compact_threshold=threshold,
        )  # fmt: skip
        for threshold in THRESHOLDS
    }
    lengths = outs[0.0].response_mask.sum(1)
    assert outs[0.0].finished.sum() >= 2 and len(set(lengths.tolist())) >= 3  # rows stop at varied times
    assert compactions and min(compactions) < ids.shape[0]  # and the batch really shrank
    for threshold in THRESHOLDS[1:]:
        # A smaller batch may take other matmul kernels: log-probs agree to float32 rounding.
        _same_outputs(outs[0.0], outs[threshold], logprob_atol=1e-5)
