"""Load tokenizers and models from hub names or local dirs, ready for training."""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge.config import ModelConfig


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (pad = eos when the model has none, as for Llama and GPT-2)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer {name_or_path} has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token
    return tok


def _common_kwargs(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    return kwargs


def disable_dropout(model: torch.nn.Module) -> None:
    """Zero every dropout probability: RLHF log-prob ratios must not be noise from dropout masks."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def _check_exists(name_or_path: str) -> None:
    p = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"model dir {name_or_path} has no config.json: pass a Hugging Face model dir or a hub name"
        )


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype, pad_token_id: int | None = None):
    from transformers import AutoModelForCausalLM

    _check_exists(cfg.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **_common_kwargs(cfg, dtype))
    _finish(model, cfg, pad_token_id)
    return model


def load_scorer(cfg: ModelConfig, dtype: torch.dtype, pad_token_id: int | None = None):
    """A sequence-classification model with one output (reward model or critic).

    A causal-LM checkpoint works too: transformers keeps the backbone and initialises a fresh `score` head.
    """
    from transformers import AutoModelForSequenceClassification

    _check_exists(cfg.name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.name_or_path, num_labels=1, **_common_kwargs(cfg, dtype)
    )
    _finish(model, cfg, pad_token_id)
    return model


def _finish(model, cfg: ModelConfig, pad_token_id: int | None) -> None:
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    if cfg.disable_dropout:
        disable_dropout(model)
