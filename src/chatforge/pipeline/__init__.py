"""The three steps end to end (`chatforge train`) and the built-in demo (`chatforge demo`)."""

from .config import PipelineConfig
from .run import Layout, PipelineError, load_pipeline_config, run_pipeline

__all__ = ["Layout", "PipelineConfig", "PipelineError", "load_pipeline_config", "run_pipeline"]
