"""A run's directory and what it records: the layout, metrics (metrics.jsonl plus the trackers asked for in
train.report_to), the progress bar and the DONE marker. No DeepSpeed here."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("chatforge")


class RunDirError(ValueError):
    """A run dir that cannot be used as asked (another step's, or not writable)."""


STEP_MARKER = "STEP"


def check_run_dir(root: Path, step: str, resume: bool) -> None:
    """Raise RunDirError when `root` cannot take a `step` run (see `RunDir.claim`); reads only."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunDirError(f"train.output_dir {root} is a file, not a dir. Fix: give a dir path")
    existing = next(p for p in [root, *root.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise RunDirError(
            f"cannot create train.output_dir {root}: {existing} is a file. Fix: give a dir path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"train.output_dir {root} is not writable ({existing}). Fix: give a writable dir")
    marker = root / STEP_MARKER
    owner = marker.read_text().strip() if marker.is_file() else step
    if owner != step:
        raise RunDirError(
            f"{root} holds a '{owner}' run; a '{step}' run cannot write there. Fix: give "
            f"train.output_dir another dir (the default for {step} is runs/{step})"
        )
    if resume:
        return
    state = "finished" if (root / "DONE").is_file() else "checkpointed" if _has_checkpoint(root) else None
    if state:
        raise RunDirError(
            f"{root} holds a {state} '{step}' run. Fix: continue it with --resume (train.resume=true), or "
            "give train.output_dir a new dir (a fresh run there would replace its model)"
        )


def _has_checkpoint(root: Path) -> bool:
    return any((root / "checkpoints").glob("*/latest"))


@dataclass(frozen=True)
class RunDir:
    """Layout of one training run: <output_dir>/{checkpoints,tb,metrics.jsonl,samples.jsonl,config.yaml,DONE}."""

    root: Path
    final_model: Path

    @classmethod
    def create(
        cls, output_dir: str, final_model_dir: str | None = None, default_model: str = "model"
    ) -> RunDir:
        root = Path(output_dir)
        if root.exists() and not root.is_dir():
            raise RunDirError(f"train.output_dir {root} is a file, not a dir. Fix: give a dir path")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(
                f"cannot create train.output_dir {root} ({exc.strerror}). Fix: give a writable dir"
            ) from None
        if not os.access(root, os.W_OK):
            raise RunDirError(f"train.output_dir {root} is not writable. Fix: give a writable dir")
        return cls(root, Path(final_model_dir) if final_model_dir else root / default_model)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def done_marker(self) -> Path:
        return self.root / "DONE"

    def claim(self, step: str, is_main: bool, resume: bool = True) -> None:
        """Record which step writes here. Refuse a run dir another step wrote (a reward run would overwrite
        the SFT model and mix its metrics into the SFT run's), and a fresh run (resume=False) where a run of
        this step already checkpointed or finished (starting over would replace what it made)."""
        check_run_dir(self.root, step, resume)
        if is_main and not (self.root / STEP_MARKER).is_file():
            (self.root / STEP_MARKER).write_text(step + "\n")

    def mark_done(self, is_main: bool, step: int, final: dict) -> None:
        if is_main:
            self.done_marker.write_text(json.dumps({"step": step, **final}))


class MetricsLogger:
    """One JSON line per record in metrics.jsonl (phase, step, wall time, values), plus the trackers of
    train.report_to (tensorboard, wandb, mlflow). The jsonl file is the source of truth for reports; every
    line is flushed as it is written, so a crash loses nothing that was logged."""

    def __init__(self, run: RunDir, is_main: bool, report_to: list[str] = (), config: dict | None = None):
        from .trackers import open_trackers

        self.is_main = is_main
        self.start = time.time()
        self._file = open(run.metrics, "a") if is_main else None  # noqa: SIM115 - lives as long as the run
        self._trackers = open_trackers(report_to, run, config or {}) if is_main else []

    def log(self, phase: str, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        record = {"phase": phase, "step": step, "time": round(time.time() - self.start, 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        finite = {f"{phase}/{k}": v for k, v in clean.items() if math.isfinite(v)}
        for tracker in self._trackers:
            tracker.log(finite, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        for tracker in self._trackers:
            tracker.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    records = []
    p = Path(path)
    if not p.is_file():
        return records
    for line in p.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Progress:
    """A tqdm bar with ETA and the latest loss, on the main rank only."""

    def __init__(self, total: int, desc: str, is_main: bool, initial: int = 0):
        self._bar = None
        if is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
