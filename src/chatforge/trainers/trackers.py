"""Experiment trackers behind train.report_to: tensorboard, Weights & Biases, MLflow. Each is an optional
import; a tracker asked for but not installed is a one-line error naming the extra to install."""

from __future__ import annotations

import os
import time
from typing import Protocol

from chatforge.config import ConfigError

MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a param value (MAX_PARAM_VAL_LENGTH)


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
    """A wandb run named after the run dir, its config the run's config. The run's files go under
    $WANDB_DIR, else into the run dir; WANDB_MODE=offline, WANDB_PROJECT etc. act as wandb documents."""

    def __init__(self, run, config: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "chatforge"), name=run.root.resolve().name,
            dir=None if os.environ.get("WANDB_DIR") else str(run.root), config=config,
            reinit="finish_previous",
        )  # fmt: skip

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run named after the run dir, in experiment $MLFLOW_EXPERIMENT_NAME (default chatforge) of
    $MLFLOW_TRACKING_URI (default: MLflow's own, sqlite:///mlflow.db in the working dir); the config is
    logged as flattened params (`data.max_length`).

    Uses MlflowClient, not the fluent API: no process-global active run, so two steps in one process (or
    a user's own run around chatforge) do not collide."""

    def __init__(self, run, config: dict):
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Param
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.client = MlflowClient()
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "chatforge")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=run.root.resolve().name).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in _flatten(config).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
