"""The engine boundary: the only package that imports deepspeed.

Trainers build a `TrainEngine` per model (or an `RLHFEngine` for step 3) from a `ModelSpec` and use its
verbs (`logprobs`, `values`, `scores`, `lm_loss`), `backward`/`step`, `gathered()`, `save_hf()` and the
checkpoint methods; nothing outside this package touches DeepSpeed or a model's forward.
"""

from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .ds_config import build_ds_config, resolve_precision, torch_dtype
from .export import atomic_dir, gathered_state_dict, save_hf
from .spec import ModelSpec
from .train_engine import DropoutStillActive, TrainEngine, zero3_init

__all__ = [
    "DistInfo",
    "DropoutStillActive",
    "ModelSpec",
    "TrainEngine",
    "all_reduce_sum",
    "atomic_dir",
    "barrier",
    "build_ds_config",
    "gathered_state_dict",
    "init_distributed",
    "resolve_precision",
    "save_hf",
    "torch_dtype",
    "zero3_init",
]
