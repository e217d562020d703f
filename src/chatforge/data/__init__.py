"""The data layer: dataset specs -> unified rows -> step splits -> token rows -> batches.

    data = load_step_data(cfg.data, tokenizer, "sft")     # or "reward", "ppo", "ptx"
    loader = DataLoader(data.train, collate_fn=SFTCollator(tokenizer), ...)

See docs/data.md for formats, the spec syntax, split/blend semantics, truncation, packing and the cache.
"""

from .collate import PairCollator, PromptCollator, SFTCollator, model_inputs, pad_id_of
from .errors import DataError
from .formats import FORMATS, detect_format
from .pipeline import StepData, cache_key, load_step_data
from .render import FALLBACK_TEMPLATE, ChatRenderer
from .spec import DatasetSpec, parse_spec
from .tokenize import IGNORE_INDEX

__all__ = [
    "FALLBACK_TEMPLATE",
    "FORMATS",
    "IGNORE_INDEX",
    "ChatRenderer",
    "DataError",
    "DatasetSpec",
    "PairCollator",
    "PromptCollator",
    "SFTCollator",
    "StepData",
    "cache_key",
    "detect_format",
    "load_step_data",
    "model_inputs",
    "pad_id_of",
    "parse_spec",
]
