"""Exact stopping, masking, position and mode behaviour with a model whose logits are scripted."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.config.schema import GenerationConfig
from chatforge.generation import generate, stream_generate

from .scripted import ScriptedLM, one_hot_script

PAD, EOS = 0, 1
GREEDY = GenerationConfig(max_new_tokens=5, do_sample=False)


def _prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((batch, 3), 4)
    mask = torch.ones(batch, 3, dtype=torch.long)
    ids[0, 0], mask[0, 0] = PAD, 0  # row 0 is left padded
    return ids, mask


def _run(rows, config=GREEDY, eos=EOS, **kw):
    ids, mask = _prompt(len(rows))
    model = ScriptedLM(one_hot_script(rows))
    return model, generate(model, ids, mask, config, eos_token_id=eos, pad_token_id=PAD, **kw)


def test_eos_stops_row_includes_eos_and_pads_after():
    rows = [[5, 6, EOS, 7, 8], [EOS, 9, 9, 9, 9], [3, 3, 3, 3, 3]]
    _, out = _run(rows)
    assert out.sequences[:, 3:].tolist() == [
        [5, 6, EOS, PAD, PAD],
        [EOS, PAD, PAD, PAD, PAD],
        [3, 3, 3, 3, 3],
    ]
    assert out.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert out.finished.tolist() == [True, True, False]
    assert (out.logprobs[out.response_mask == 0] == 0).all()
    assert out.sequences[:, :3].tolist() == _prompt(3)[0].tolist()  # prompt returned as given


def test_eos_on_last_allowed_token_counts_as_finished():
    _, out = _run([[5, 6, 7, 8, EOS]])
    assert out.response_mask.tolist() == [[1, 1, 1, 1, 1]]
    assert out.finished.tolist() == [True]


def test_loop_stops_when_every_row_finished():
    model, out = _run([[EOS, 9, 9, 9, 9], [4, EOS, 9, 9, 9]])
    assert out.sequences.shape == (2, 3 + 2)
    assert model.calls == 2  # prefill + one cached step, nothing after both rows stopped
    assert out.response_mask.tolist() == [[1, 0], [1, 1]]


def test_several_eos_ids():
    _, out = _run([[5, 2, 7, 7, 7], [5, 6, EOS, 7, 7]], eos=[EOS, 2])
    assert out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


def test_positions_come_from_the_mask_and_the_mask_grows():
    model, _ = _run(
        [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]], config=GenerationConfig(max_new_tokens=3, do_sample=False)
    )
    # Row 0 is [pad, x, x]: its first real token gets position 0, as in an unpadded row.
    assert model.seen_positions[0][:, 1:].tolist() == [[0, 1], [1, 2]]
    assert [p.tolist() for p in model.seen_positions[1:]] == [[[2], [3]], [[3], [4]]]
    assert [m.shape[1] for m in model.seen_masks] == [3, 4, 5]
    assert model.seen_masks[-1].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_logprobs_are_hand_computed_values():
    # Chosen logit ln 3, 15 others 0: p = 3 / 18 -> ln(1/6). With T = 0.5: 9 / (9 + 15) -> ln(3/8).
    rows = [[5, 6, 7]]
    ids, mask = _prompt(1)
    for temperature, expected in ((1.0, math.log(1 / 6)), (0.5, math.log(3 / 8))):
        model = ScriptedLM(one_hot_script(rows, peak=math.log(3.0)))
        config = GenerationConfig(max_new_tokens=3, do_sample=False, temperature=temperature)
        out = generate(model, ids, mask, config, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.allclose(out.logprobs, torch.full((1, 3), expected), atol=1e-6)


def test_stop_checker_stops_and_keeps_the_stop_token():
    calls: list[list[int]] = []

    def stop_after_7_8(ids: list[int]) -> bool:
        calls.append(list(ids))
        return ids[-2:] == [7, 8]

    _, out = _run([[6, 7, 8, 9, 9], [7, 9, 9, 9, 9]], stop_checker=stop_after_7_8)
    assert out.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out.finished.tolist() == [True, False]
    assert [6, 7, 8] in calls and [6, 7, 8, PAD] not in calls  # only the generated ids, never after a stop


def test_stop_strings_without_checker_is_an_error():
    with pytest.raises(ValueError, match="stop_checker"):
        _run([[5, 5, 5, 5, 5]], config=GenerationConfig(max_new_tokens=5, stop_strings=["\nUser:"]))


def test_repetition_penalty_avoids_prompt_tokens():
    script = torch.full((1, 1, 16), -10.0)
    script[0, 0, 4], script[0, 0, 6] = 2.0, 1.5  # 4 is in the prompt: 2.0 / 2 = 1.0 < 1.5
    config = GenerationConfig(max_new_tokens=1, do_sample=False, repetition_penalty=2.0)
    ids, mask = _prompt(1)
    out = generate(ScriptedLM(script), ids, mask, config, eos_token_id=EOS, pad_token_id=PAD)
    assert out.sequences[0, -1].item() == 6
    config.repetition_penalty = 1.0
    out = generate(ScriptedLM(script), ids, mask, config, eos_token_id=EOS, pad_token_id=PAD)
    assert out.sequences[0, -1].item() == 4


def test_train_and_eval_modes_are_restored():
    model = ScriptedLM(one_hot_script([[5, 5, 5, 5, 5]]))
    model.train()
    model.dropout.eval()  # a mixed state must come back exactly
    ids, mask = _prompt(1)
    generate(model, ids, mask, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    assert model.training and not model.dropout.training


def test_outputs_are_plain_tensors_usable_in_autograd():
    _, out = _run([[5, 6, EOS, 7, 8]])
    assert not out.sequences.requires_grad and not torch.is_inference(out.sequences)
    emb = torch.nn.Embedding(16, 2)
    emb(out.sequences).sum().backward()  # a PPO training forward takes these ids
    assert emb.weight.grad is not None


def test_stream_equals_generate_and_restores_mode_when_closed_early():
    rows = [[5, 6, 7, EOS, 9]]
    ids, mask = _prompt(1)
    out = generate(ScriptedLM(one_hot_script(rows)), ids, mask, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    model = ScriptedLM(one_hot_script(rows)).train()
    streamed = list(stream_generate(model, ids, mask, GREEDY, eos_token_id=EOS, pad_token_id=PAD))
    assert streamed == out.sequences[0, 3:][out.response_mask[0] == 1].tolist() == [5, 6, 7, EOS]
    assert model.training

    model = ScriptedLM(one_hot_script(rows)).train()
    stream = stream_generate(model, ids, mask, GREEDY, eos_token_id=EOS, pad_token_id=PAD)
    assert next(stream) == 5
    assert not model.training and torch.is_grad_enabled()  # grad mode is not held across a yield
    stream.close()
    assert model.training
