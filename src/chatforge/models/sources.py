"""Checks of a model source (a local dir or a hub name) that read only small files, so a bad model fails in
one line before any weights load, in the `chatforge train` parent as in a step. No torch here."""

from __future__ import annotations

import json
import struct
from pathlib import Path

# Files any tokenizer class reads from; a dir with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
)  # fmt: skip
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


class ModelLoadError(ValueError):
    """A model or tokenizer cannot be loaded as asked; the message names it and the fix."""


def looks_local(name_or_path: str) -> bool:
    """A path, not a hub name: it exists, starts like a path, or has more slashes than 'ORG/NAME' can."""
    text = name_or_path.strip()
    return (
        Path(text).expanduser().exists()
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or text.endswith("/")
    )


def check_model_source(name_or_path: str, trust_remote_code: bool = False) -> None:
    """A local-looking path must be a complete model dir (config, weights, loadable code); a hub name must be
    well formed (whether it exists is only known when it loads)."""
    if not name_or_path:
        raise ModelLoadError("a model path is empty: give a local model dir or a hub name")
    if not looks_local(name_or_path):
        _check_hub_name(name_or_path)
        return
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model dir {name_or_path} does not exist: check the path (or give a hub name)")
    if not p.is_dir():
        raise ModelLoadError(
            f"{name_or_path} is a file, not a model dir: give the dir that holds config.json"
        )
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        return  # a LoRA adapter dir: its base model is checked when it loads
    if not (p / "config.json").is_file():
        raise ModelLoadError(
            f"{name_or_path} is not a Hugging Face model dir (no config.json): point to the dir a training "
            "step wrote (e.g. DIR/actor-sft) or give a hub name"
        )
    config = _read_config(p)
    _check_remote_code(name_or_path, config, trust_remote_code)
    _check_weights(p)


def check_tokenizer_files(name_or_path: str) -> None:
    """A local model dir must carry its tokenizer (chatforge reads the tokenizer from the model dir)."""
    p = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"{name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): save the base model's "
            f"tokenizer into it (AutoTokenizer.from_pretrained(BASE).save_pretrained('{name_or_path}'))"
        )


def check_reward_model(name_or_path: str) -> None:
    """A local reward-model dir must have its trained score head: one output, or a chatforge ensemble's K
    (`load_scorer` with heads=None checks the same, and hub models, when they load)."""
    p = Path(name_or_path).expanduser()
    if not (looks_local(name_or_path) and (p / "config.json").is_file()):
        return
    config = _read_config(p)
    kinds = config.get("architectures") or ["no architectures in config.json"]
    fix = "give the dir step 2 wrote (DIR/reward), or a sequence-classification model with one output"
    if not any(k.endswith("ForSequenceClassification") for k in kinds):
        raise ModelLoadError(
            f"{name_or_path} is not a reward model ({', '.join(kinds)}, no score head): {fix}"
        )
    labels = len(config["id2label"]) if "id2label" in config else config.get("num_labels", 2)
    if not config.get("chatforge_reward_heads") and labels != 1:
        raise ModelLoadError(f"{name_or_path} has a score head with num_labels={labels}, not 1: {fix}")


def _check_hub_name(name: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelLoadError(
            f"{name}: no such model dir, and not a valid hub name (ORG/NAME): check the path"
        ) from None


def _read_config(p: Path) -> dict:
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"{p / 'config.json'} is not valid JSON ({exc}): re-export the model (the file may be truncated)"
        ) from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{p / 'config.json'} is not a JSON object: re-export the model")
    return config


def _check_remote_code(name: str, config: dict, trust_remote_code: bool) -> None:
    """A model whose type transformers does not know runs code from its own repo: refuse it unless trusted."""
    if trust_remote_code or "auto_map" not in config:
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{name} needs its own modelling code (model_type {config.get('model_type')!r}, auto_map in "
            "config.json): set engine.trust_remote_code=true if you trust that code"
        )


def _check_weights(p: Path) -> None:
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in p.glob(pattern)})
    if not files:
        raise ModelLoadError(
            f"{p} has config.json but no weights (model.safetensors or pytorch_model.bin): re-export the model"
        )
    for file in files:
        if file.name.endswith(".safetensors"):
            _check_safetensors(file)


def _check_safetensors(path: Path) -> None:
    """The header's tensors must end exactly at the end of the file (a copy cut short does not)."""
    size = path.stat().st_size
    problem = None
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            problem = "its header is cut short"
        else:
            try:
                header = json.loads(f.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):
                problem = "its header is not valid"
            else:
                if 8 + n + end != size:
                    problem = f"it holds {size} bytes but its header describes {8 + n + end}"
    if problem:
        raise ModelLoadError(f"{path} is incomplete or corrupt ({problem}): copy or export the model again")
