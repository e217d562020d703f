"""Experiment trackers behind train.report_to: tensorboard, Weights & Biases, MLflow. Each is an optional
import; a tracker asked for but not installed is a one-line error naming the extra to install."""

from __future__ import annotations

import os
from typing import Protocol

from chatforge.config import ConfigError


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


def open_trackers(report_to, run, config: dict) -> list[Tracker]:
    """The trackers of `report_to` for run dir `run`, with the run's name (its dir name) and config."""
    names = [n for n in report_to if n != "none"]
    openers = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
    return [openers[name](run, config) for name in names]


def _missing(name: str, package: str) -> ConfigError:
    return ConfigError(
        f"train.report_to includes {name}, but {package} is not installed: pip install 'chatforge[trackers]' "
        f"(or remove {name} from train.report_to)"
    )


class _TensorBoard:
    def __init__(self, run, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(str(run.root / "tb"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A wandb run named after the run dir; WANDB_MODE=offline (or WANDB_PROJECT etc.) as the user sets."""

    def __init__(self, run, config: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "chatforge"), name=run.root.resolve().name,
            dir=str(run.root), config=config, reinit="finish_previous",
        )  # fmt: skip

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run named after the run dir, in $MLFLOW_TRACKING_URI (default: ./mlruns); the config is
    logged as flattened params."""

    def __init__(self, run, config: dict):
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "chatforge"))
        self.active = mlflow.start_run(run_name=run.root.resolve().name)
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(config).items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
