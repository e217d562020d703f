"""train.report_to with real trackers: a short `chatforge sft` logging to Weights & Biases (offline) and to
MLflow (a local sqlite store), each read back with the tool's own data: the run's name, its config and a
metric's value at every step equal what the run wrote to metrics.jsonl.

Needs the `trackers` extra (pip install 'chatforge[trackers]'); a test is skipped only when its package is
not importable."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from chatforge.trainers.run_dir import read_metrics

BUDGET = ("train.max_steps=3", "train.eval_every=2", "batch.micro_batch_size=8", "data.eval_fraction=0.01")


def expected_curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """'phase/metric' -> {step: value} from metrics.jsonl, the names the trackers get."""
    curves: dict[str, dict[int, float]] = {}
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in rec.items():
            if key not in ("phase", "step", "time"):
                curves.setdefault(f"{rec['phase']}/{key}", {})[rec["step"]] = value
    return curves


def train_sft(runs, out: Path, tracker: str, env: dict) -> dict[str, dict[int, float]]:
    runs.cli("sft", runs.args("sft", out, *BUDGET, f"train.report_to=[{tracker}]"), env=env)
    curves = expected_curves(out)
    assert sorted(curves["train/loss"]) == [1, 2, 3] and sorted(curves["eval/loss"]) == [0, 2, 3]
    return curves


# --- Weights & Biases ---------------------------------------------------------------------------------
WANDB_HEADER = (
    b":W&B"  # the .wandb file: this ident, a 2-byte magic, a version byte, then LevelDB-log records
)
LOG_BLOCK = 32768  # LevelDB log block; a record chunk has a 7-byte header (crc32c, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf records of a .wandb transaction log (wandb has no public offline reader; the framing is
    LevelDB's log format and the messages are wandb's own `Record`)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == WANDB_HEADER, data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = LOG_BLOCK - pos % LOG_BLOCK
        if room < 7:  # a block's tail too short for a header is zero padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += room
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(path: Path) -> tuple[object, dict[str, dict[int, float]]]:
    """(the run record, 'key' -> {step: value}) of an offline run."""
    run, history = None, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, {})[step] = json.loads(item.value_json)
    return run, history


def test_wandb_offline_run_holds_name_config_and_every_step(runs, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'chatforge[trackers]')")
    out, wandb_dir = tmp_path / "sft-wandb", tmp_path / "wandb-home"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_PROJECT": "cf-test"}
    curves = train_sft(runs, out, "wandb", env)

    logs = list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    assert not (out / "wandb").exists()  # WANDB_DIR wins over the run dir
    run, history = wandb_history(logs[0])
    assert run.display_name == "sft-wandb" and run.project == "cf-test"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["train"]["max_steps"] == 3 and config["data"]["max_length"] == 96
    assert config["model"]["name_or_path"] == str(runs.fixture_dir / "llama")
    for key in ("train/loss", "train/lr", "eval/loss", "eval/perplexity"):
        assert history[key] == pytest.approx(curves[key], rel=1e-6), key


# --- MLflow -------------------------------------------------------------------------------------------
def test_mlflow_run_holds_name_params_and_every_step(runs, tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'chatforge[trackers]')")
    pytest.importorskip("sqlalchemy", reason="MLflow's sqlite store needs sqlalchemy")
    from mlflow import MlflowClient

    out, uri = tmp_path / "sft-mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "cf-test"}
    curves = train_sft(runs, out, "mlflow", env)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("cf-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "sft-mlflow" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.max_steps"] == "3" and params["data.max_length"] == "96"
    assert params["model.name_or_path"] == str(runs.fixture_dir / "llama")
    assert params["train.report_to"] == "['mlflow']"
    for key in ("train/loss", "train/lr", "eval/loss", "eval/perplexity"):
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged == pytest.approx(curves[key], rel=1e-6), key
