"""Which forward argument carries the KV cache, and a loud error when a model ignores it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatforge.config.schema import GenerationConfig
from chatforge.generation import engine, generate

from .scripted import ScriptedLM, one_hot_script


class OldNameLM(ScriptedLM):
    """A model that only knows the pre-5.24 name (remote code, or transformers < 5.24)."""

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, **kw):
        return super().forward(input_ids, attention_mask, position_ids, cache=past_key_values)


class KwargsWrapper(nn.Module):
    """A wrapper that forwards **kwargs (as peft's PeftModel does): its signature names no cache."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


class CacheIgnoringLM(ScriptedLM):
    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=True, **kw):
        return super().forward(input_ids, attention_mask, position_ids, cache=type(cache)())


def _run(model):
    ids, mask = torch.full((2, 3), 4), torch.ones(2, 3, dtype=torch.long)
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    return generate(model, ids, mask, config, eos_token_id=1, pad_token_id=0)


def test_the_forward_signature_decides_the_cache_argument():
    rows = [[5, 6, 7], [7, 6, 5]]
    assert engine._cache_keyword(ScriptedLM(one_hot_script(rows))) == "cache"
    assert engine._cache_keyword(OldNameLM(one_hot_script(rows))) == "past_key_values"
    # The old-name model still decodes its script: the cache really reached it.
    assert _run(OldNameLM(one_hot_script(rows))).sequences[:, 3:].tolist() == rows


@pytest.mark.parametrize(("version", "expected"), [("5.23.0", "past_key_values"), ("5.24.0", "cache")])
def test_a_kwargs_wrapper_gets_the_installed_transformers_name(version, expected, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert engine._cache_keyword(KwargsWrapper(ScriptedLM(one_hot_script([[5]])))) == expected


def test_the_installed_transformers_models_take_cache(fixture_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir / "llama"))
    assert engine._cache_keyword(model) == (
        "cache" if engine._transformers_renamed_cache() else "past_key_values"
    )


def test_a_model_that_ignores_the_cache_is_a_loud_error():
    with pytest.raises(RuntimeError, match="did not fill the KV cache passed as `cache=`"):
        _run(CacheIgnoringLM(one_hot_script([[5, 6, 7], [7, 6, 5]])))
