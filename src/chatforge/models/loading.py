"""Load tokenizers and models from hub names or local dirs, ready for training, with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .sources import ModelLoadError, check_model_source, check_tokenizer_files, looks_local

__all__ = [
    "LoadOptions", "ModelLoadError", "check_model_source", "load_causal_lm", "load_scorer",
    "load_tokenizer",
]  # fmt: skip
# What transformers raises for a model it cannot read (a corrupt weight file raises SafetensorError).
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


@dataclass(frozen=True)
class LoadOptions:
    """How every model of a command is built (from the config's `engine` section)."""

    trust_remote_code: bool = False
    attn_implementation: str | None = None
    dropout: bool = False
    """Keep the checkpoint's dropout; False removes every dropout (see `remove_dropout`)."""


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, model_dir: bool = True):
    """A tokenizer with a pad token (pad = eos when the model has none, as for Llama 3 and GPT-2).
    `model_dir=False` accepts a dir that holds only a tokenizer."""
    from transformers import AutoTokenizer

    if model_dir:
        check_model_source(name_or_path, trust_remote_code)
    elif looks_local(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise ModelLoadError(
            f"tokenizer dir {name_or_path} does not exist: check the path (or give a hub name)"
        )
    check_tokenizer_files(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise ModelLoadError(_explain_load_error(name_or_path, "tokenizer", exc)) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"tokenizer {name_or_path} has neither a pad nor an eos token; add one")
        tok.pad_token = tok.eos_token
    return tok


def _explain_load_error(name: str, what: str, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "trust_remote_code" in str(exc):
        return f"{name} needs its own modelling code: set engine.trust_remote_code=true if you trust it"
    if Path(name).expanduser().is_dir():
        return f"cannot load the {what} in {name}: {text}. Fix: re-export it (the dir may be incomplete)"
    return (
        f"cannot load the {what} {name!r} ({text}). Fix: check the name, or that it is in the local "
        "Hugging Face cache when offline"
    )


def _kwargs(opts: LoadOptions, dtype: torch.dtype) -> dict:
    kwargs = {"dtype": dtype, "trust_remote_code": opts.trust_remote_code}
    if opts.attn_implementation:
        kwargs["attn_implementation"] = opts.attn_implementation
    return kwargs


def remove_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0, wherever a family keeps it.

    `nn.Dropout` modules are not enough: Llama, Qwen2 and OPT copy the rate into float attributes at init
    (`self.attention_dropout`, `self.dropout`, `self.activation_dropout`, OPT's `layerdrop`) and call
    `F.dropout(..., training=self.training)`. So every float attribute whose name mentions "drop" is zeroed,
    and the config's fields too (for modules built later). `engine.check_no_dropout` verifies the result.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and "drop" in name.lower():
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and "drop" in name.lower():
                setattr(config, name, 0.0)


def load_causal_lm(name_or_path: str, opts: LoadOptions, dtype: torch.dtype, pad_token_id: int | None = None):
    from transformers import AutoModelForCausalLM

    check_model_source(name_or_path, opts.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **_kwargs(opts, dtype))
    except LOAD_ERRORS as exc:
        raise ModelLoadError(_explain_load_error(name_or_path, "model", exc)) from None
    _finish(model, opts, pad_token_id)
    return model


REWARD_HEADS_KEY = "chatforge_reward_heads"  # also read by models/sources.py


def load_scorer(
    name_or_path: str, opts: LoadOptions, dtype: torch.dtype, pad_token_id: int | None = None,
    heads: int | None = None,
):  # fmt: skip
    """A sequence-classification model: a reward model (ensemble heads) or a critic.

    `heads=None` loads a frozen reward model as it was trained: its score head must exist (1 output, or
    the K heads of a chatforge ensemble). With `heads=K` (training), a causal-LM checkpoint or one with
    another head count gets a fresh K-output head on its backbone, said in one line instead of
    transformers' table of missing and unexpected keys."""
    config = _scorer_config(name_or_path, opts.trust_remote_code)
    trained_heads = _reward_heads(config)
    if heads is None:
        if trained_heads is None:
            raise ModelLoadError(f"{name_or_path} {_not_a_reward_model(config)}")
        heads = trained_heads
    elif trained_heads != heads:
        import logging

        logging.getLogger("chatforge").info(
            "%s: a new %d-output score head on its backbone (expected when training from a causal LM)",
            name_or_path, heads,
        )  # fmt: skip
    config.num_labels = heads
    setattr(config, REWARD_HEADS_KEY, heads)
    model = _from_pretrained_quietly(name_or_path, config, opts, dtype)
    _finish(model, opts, pad_token_id)
    return model


def _scorer_config(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    check_model_source(name_or_path, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise ModelLoadError(_explain_load_error(name_or_path, "model", exc)) from None


def _reward_heads(config) -> int | None:
    """Score heads of a checkpoint: a chatforge ensemble's count, 1 for a one-output classifier, else None."""
    if not _is_scorer(config):
        return None
    if getattr(config, REWARD_HEADS_KEY, None):
        return int(getattr(config, REWARD_HEADS_KEY))
    return 1 if getattr(config, "num_labels", None) == 1 else None


def _from_pretrained_quietly(name_or_path: str, config, opts: LoadOptions, dtype: torch.dtype):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the expected "newly initialized score" report
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            name_or_path, config=config, ignore_mismatched_sizes=True, **_kwargs(opts, dtype)
        )
    except LOAD_ERRORS as exc:
        raise ModelLoadError(_explain_load_error(name_or_path, "model", exc)) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _not_a_reward_model(config) -> str:
    """Why a checkpoint cannot score as it is, and the fix."""
    fix = "give the dir step 2 wrote (DIR/reward), or a sequence-classification model with one output"
    if not _is_scorer(config):
        kind = ", ".join(getattr(config, "architectures", None) or ["no architectures in config.json"])
        return f"is not a reward model ({kind}, no score head): {fix}"
    return f"has a score head with num_labels={getattr(config, 'num_labels', None)}, not 1: {fix}"


def _is_scorer(config) -> bool:
    return any(
        a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])
    )


def _finish(model, opts: LoadOptions, pad_token_id: int | None) -> None:
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id
    if not opts.dropout:
        remove_dropout(model)
