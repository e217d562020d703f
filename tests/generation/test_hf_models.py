"""Our cached loop against transformers and against full forward passes, on every fixture family."""

from __future__ import annotations

import warnings

import pytest
import torch

from chatforge.config.schema import GenerationConfig
from chatforge.fixtures import FAMILIES
from chatforge.generation import StopStrings, generate, stream_generate

PROMPTS = ["What is 12 + 7?", "Hello there, how are you doing today, my friend?", "x"]
NEW = 10


@pytest.fixture(scope="module")
def models(fixture_dir):
    from transformers import AutoModelForCausalLM

    return {f: AutoModelForCausalLM.from_pretrained(str(fixture_dir / f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def batch(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert (enc.attention_mask == 0).any()  # the batch really is left padded
    return enc.input_ids, enc.attention_mask


def _gen(model, batch, tokenizer, config, **kw):
    ids, mask = batch
    return generate(
        model,
        ids,
        mask,
        config,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(family, models, batch, tokenizer):
    model = models[family]
    out = _gen(model, batch, tokenizer, GenerationConfig(max_new_tokens=NEW, do_sample=False))
    ref = model.generate(
        input_ids=batch[0],
        attention_mask=batch[1],
        do_sample=False,
        max_new_tokens=NEW,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert torch.equal(out.sequences, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_row_alone(family, models, batch, tokenizer):
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False)
    out = _gen(models[family], batch, tokenizer, config)
    prompt_len = batch[0].shape[1]
    for row in range(len(PROMPTS)):
        real = batch[1][row] == 1
        ids = batch[0][row][real][None]
        alone = _gen(models[family], (ids, torch.ones_like(ids)), tokenizer, config)
        batched_response = out.sequences[row, prompt_len:][out.response_mask[row] == 1]
        assert torch.equal(batched_response, alone.sequences[0, ids.shape[1] :][alone.response_mask[0] == 1])
        n = alone.logprobs.shape[1]
        assert torch.allclose(out.logprobs[row, :n], alone.logprobs[0], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_equal_a_full_forward_pass(family, models, batch, tokenizer):
    model = models[family]
    config = GenerationConfig(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=40, top_p=0.9)
    out = _gen(model, batch, tokenizer, config, generator=torch.Generator().manual_seed(0))
    mask = torch.cat([batch[1], out.response_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=mask, position_ids=positions).logits
    prompt_len = batch[0].shape[1]
    # The logits at position t predict token t + 1.
    pred = logits[:, prompt_len - 1 : -1].float() / config.temperature
    expected = pred.log_softmax(-1).gather(-1, out.sequences[:, prompt_len:, None]).squeeze(-1)
    expected = expected * out.response_mask
    assert torch.allclose(out.logprobs, expected, atol=1e-5)


def test_same_seed_same_tokens_different_seed_different(models, batch, tokenizer):
    config = GenerationConfig(max_new_tokens=NEW, do_sample=True)

    def sample(seed: int) -> torch.Tensor:
        return _gen(
            models["llama"], batch, tokenizer, config, generator=torch.Generator().manual_seed(seed)
        ).sequences

    assert torch.equal(sample(3), sample(3))
    assert not torch.equal(sample(3), sample(4))


def test_top_k_1_sampling_equals_greedy(models, batch, tokenizer):
    greedy = _gen(models["qwen2"], batch, tokenizer, GenerationConfig(max_new_tokens=NEW, do_sample=False))
    sampled = _gen(
        models["qwen2"],
        batch,
        tokenizer,
        GenerationConfig(max_new_tokens=NEW, do_sample=True, top_k=1),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy.sequences, sampled.sequences)


def test_stream_yields_the_same_tokens_as_generate(models, batch, tokenizer):
    config = GenerationConfig(max_new_tokens=NEW, do_sample=True)
    ids, mask = batch[0][1:2], batch[1][1:2]
    out = _gen(models["gpt2"], (ids, mask), tokenizer, config, generator=torch.Generator().manual_seed(5))
    streamed = stream_generate(
        models["gpt2"],
        ids,
        mask,
        config,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(5),
    )
    assert list(streamed) == out.sequences[0, ids.shape[1] :][out.response_mask[0] == 1].tolist()


def test_stop_strings_with_the_fixture_tokenizer(tokenizer):
    check = StopStrings(tokenizer, ["\nUser:"])
    ids = tokenizer("Sure, 19.\nUser: and", add_special_tokens=False).input_ids
    # The first prefix whose text contains the stop string is where generation must stop.
    texts = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    first = next(i for i, text in enumerate(texts) if "\nUser:" in text)
    assert [check(ids[: i + 1]) for i in range(len(ids))] == [i >= first for i in range(len(ids))]
    long_prefix = tokenizer("12 + 7 = 19. " * 30, add_special_tokens=False).input_ids
    assert check(long_prefix + ids[: first + 1]) and not check(long_prefix + ids[:first])
    assert not StopStrings(tokenizer, [])(ids)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sample"])
def test_generation_calls_no_deprecated_transformers_api(family, do_sample, models, batch, tokenizer):
    # transformers 5.24 renamed the forward's `past_key_values` to `cache` and warns (FutureWarning) on
    # the old name at every step; any deprecated call from the loop must fail here.
    config = GenerationConfig(max_new_tokens=4, do_sample=do_sample, repetition_penalty=1.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        _gen(models[family], batch, tokenizer, config, generator=torch.Generator().manual_seed(0))
        ids, mask = batch[0][:1], batch[1][:1]
        streamed = stream_generate(
            models[family],
            ids,
            mask,
            config,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            generator=torch.Generator().manual_seed(0),
        )
        assert len(list(streamed)) >= 1
