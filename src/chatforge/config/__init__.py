"""Typed, nested configs loadable from YAML and overridable with `key=value`."""

from .loader import (
    ConfigError,
    describe,
    field_docs,
    format_help,
    from_dict,
    load_config,
    merge_overrides,
    save_yaml,
    to_dict,
)
from .schema import (
    DataConfig,
    EngineConfig,
    GenerationConfig,
    LoopConfig,
    LoRAConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    SFTConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "EngineConfig",
    "GenerationConfig",
    "LoRAConfig",
    "LoopConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "SFTConfig",
    "describe",
    "field_docs",
    "format_help",
    "from_dict",
    "load_config",
    "merge_overrides",
    "save_yaml",
    "to_dict",
]
