"""What a report reads: the run dirs under a pipeline dir (or one run dir), their metrics and config.

Files may be half written (the report can run while training does), so every reader here skips
what it cannot parse instead of failing."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

STEP_ORDER = ("sft", "reward", "ppo")  # pipeline order; other run dirs follow alphabetically
VERSION_PACKAGES = ("torch", "transformers", "deepspeed", "peft", "datasets", "chatforge")


@dataclass(frozen=True)
class Run:
    """One run dir: its name (the step), its metric records, its config.yaml text (or None) and, for an RL
    run, the sampled responses of samples.jsonl by evaluation step (step 0 is the SFT model)."""

    name: str
    root: Path
    records: list[dict]
    config_text: str | None
    samples: dict[int, list[dict]] = field(default_factory=dict)

    def series(self, phase: str, metric: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric in one phase, sorted by step, finite values only.

        A step logged twice (a resumed run re-logs it) keeps its last value."""
        by_step: dict[float, float] = {}
        for rec in self.records:
            value, step = rec.get(metric), rec.get("step")
            if rec.get("phase") == phase and is_number(step) and is_number(value) and math.isfinite(value):
                by_step[float(step)] = float(value)
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def last_values(self) -> dict[str, dict[str, float]]:
        """phase -> metric -> last finite value logged, in first-seen order."""
        out: dict[str, dict[str, float]] = {}
        for rec in self.records:
            phase = str(rec.get("phase", "?"))
            for key, value in rec.items():
                if key not in ("phase", "step", "time") and is_number(value) and math.isfinite(value):
                    out.setdefault(phase, {})[key] = float(value)
        return out

    def wall_time(self) -> float:
        """Seconds of training: `time` restarts at 0 when a run resumes, so segments are summed."""
        total, prev = 0.0, 0.0
        for rec in self.records:
            t = rec.get("time")
            if not is_number(t) or not math.isfinite(t):
                continue
            if t < prev:
                total += prev
            prev = float(t)
        return total + prev


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file; torn, blank or non-object lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def load_run(root: Path, name: str | None = None) -> Run:
    records = read_records(root / "metrics.jsonl")
    samples = samples_by_step(read_records(root / "samples.jsonl"))
    return Run(name or root.name, root, records, read_text(root / "config.yaml"), samples)


def samples_by_step(records: list[dict]) -> dict[int, list[dict]]:
    """step -> the sample records of that evaluation, in file order; records without an integer step or a
    prompt and response are skipped.

    Every evaluation writes one block of the same size (the first held-out prompts). A resumed run that
    evaluates a step again appends another block of that step, right after the first one when the crash
    came between the evaluation and its checkpoint: of a step's records only the last block is kept, as the
    last value of a metric is. The block size is the shortest run of one step in the file."""
    runs: list[tuple[int, list[dict]]] = []
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or not _is_sample(rec):
            continue
        if not runs or runs[-1][0] != step:
            runs.append((step, []))
        runs[-1][1].append(rec)
    block = min((len(recs) for _, recs in runs), default=0)
    out = {}
    for step, recs in runs:  # a later run of a step replaces an earlier one
        out[step] = recs[len(recs) - (len(recs) - 1) % block - 1 :]
    return out


def _is_sample(rec: dict) -> bool:
    return isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str)


def find_runs(directory: Path) -> list[Run]:
    """Runs of a pipeline dir (DIR/runs/<step>/) in pipeline order, or DIR itself if it is a run dir."""
    runs_dir = directory / "runs"
    if runs_dir.is_dir():
        dirs = [p for p in runs_dir.iterdir() if p.is_dir() and _looks_like_run(p)]
        rank = {name: i for i, name in enumerate(STEP_ORDER)}
        dirs.sort(key=lambda p: (rank.get(p.name, len(STEP_ORDER)), p.name))
        return [load_run(p) for p in dirs]
    if _looks_like_run(directory):
        return [load_run(directory, directory.resolve().name)]
    return []


def _looks_like_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file()


def read_summary(directory: Path) -> dict | None:
    """DIR/demo_summary.json if present and a JSON object."""
    text = read_text(directory / "demo_summary.json")
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def versions() -> dict[str, str]:
    """Versions of the report's environment, read from package metadata (nothing heavy is imported)."""
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
