"""What a step of `chatforge train` is made from, so a rerun can tell "the same run, resume it" from "another
run in the same dir". Each step's run dir keeps `made_from.json`: its settings and a fingerprint of every
input it reads from outside the pipeline (model dirs: config and weight file sizes/times; local data files:
a content hash; an earlier step's output: the digest of that step's record). A rerun whose record differs
refuses with the first difference and the fix."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from chatforge.config import ConfigError, to_dict

RECORD = "made_from.json"
# How the step is run, not what it is made from: changing these does not make it another run.
RUN_ONLY = ("train.resume", "train.report_to")


class RerunError(ConfigError):
    """A rerun would reuse or resume a step that was made from other inputs."""


def made_from(
    step_cfg, name: str, internal: Path | None = None, produced: dict[str, str] | None = None
) -> dict:
    """{settings, inputs} of one step. A model dir under `internal` (an earlier step's output, which may not
    exist yet) is recorded as `produced[its path]`: the digest of the record of the step that writes it, so
    a step made from another step-1 model is seen as changed even if the dir has the same name."""
    settings = _flatten(to_dict(step_cfg))
    for key in RUN_ONLY:
        settings.pop(key, None)
    inputs = {f"data:{spec}": _data_fingerprint(spec) for spec in settings.get("data.datasets", [])}
    for spec in settings.get("ptx.datasets", []):
        inputs[f"data:{spec}"] = _data_fingerprint(spec)
    for key, value in settings.items():
        if key.endswith("name_or_path") or key == "reward.models":
            for path in value if isinstance(value, list) else [value]:
                inputs[f"model:{path}"] = _model_input(path, internal, produced or {})
    return {"step": name, "settings": settings, "inputs": inputs}


def record_digest(record: dict) -> str:
    """'<step>@<sha256 prefix>' of a record: what a later step made from this step's output records."""
    text = json.dumps(record, sort_keys=True)
    return f"{record['step']}@{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _model_input(path: str, internal: Path | None, produced: dict[str, str]) -> str:
    plain = path.rpartition("*")[0] if _has_weight(path) else path
    if internal is not None and _inside(plain, internal):
        return produced.get(str(Path(plain).resolve()), "internal")
    return _model_fingerprint(plain)


def _has_weight(spec: str) -> bool:
    head, sep, tail = spec.rpartition("*")
    try:
        float(tail)
    except ValueError:
        return False
    return bool(sep)


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def write_made_from(run_dir: Path, record: dict) -> None:
    tmp = run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / RECORD)


def check_rerun(run_dir: Path, name: str, record: dict, done: bool) -> None:
    """Raise RerunError when `run_dir` holds this step made (or checkpointed while being made) from other
    inputs."""
    path = run_dir / RECORD
    if not path.is_file():
        if done:
            raise RerunError(
                f"{run_dir} holds a finished '{name}' step without a record of its inputs (an older chatforge): "
                "use a new --output-dir, or --restart-from to redo it"
            )
        return
    if not done and not any((run_dir / "checkpoints").glob("*/latest")):
        return  # it stopped before its first checkpoint: nothing to resume or lose, it starts anew
    old = json.loads(path.read_text())
    diff = _first_difference(old, record)
    if diff is not None:
        state = "finished" if done else "interrupted"
        raise RerunError(
            f"step '{name}' in {run_dir} ({state}) was made from other inputs: {diff}. Use a new --output-dir, "
            f"or --restart-from <step> to redo it (and the steps after it) with the new inputs"
        )


def _first_difference(old: dict, new: dict) -> str | None:
    for section in ("settings", "inputs"):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _describe_change(section, key, a.get(key), b.get(key))
    return None


def _describe_change(section: str, key: str, old, new) -> str:
    if section == "settings":
        return f"setting {key} was {_short(old)}, now {_short(new)}"
    kind, _, what = key.partition(":")
    if old is None or new is None:
        return f"{kind} input {what} {'is new' if old is None else 'is no longer used'}"
    if kind == "data":
        return f"the content of data file {what} changed since (sha256 {old[:12]}..., now {new[:12]}...)"
    if "@" in str(new):  # an earlier step's output
        return f"{what} (the output of step '{new.partition('@')[0]}') is now made from other inputs"
    return f"model {what} changed since (its config.json or weight files)"


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "columns":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _data_fingerprint(spec: str) -> str:
    """sha256 of a local file's content (all files of a dir), or the spec itself for a hub dataset."""
    from chatforge.data.spec import parse_spec

    path = Path(parse_spec(spec).path).expanduser()
    if not path.exists():
        return f"hub:{spec}"
    if path.is_file():
        return _file_sha256(str(path.resolve()), *_size_time(path))
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        sha = _file_sha256(str(file.resolve()), *_size_time(file))
        digest.update(f"{file.relative_to(path)}:{sha}\n".encode())
    return digest.hexdigest()


def _size_time(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, once per (file, size, mtime) in a process: every step reads the same data files."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_fingerprint(name_or_path: str) -> str:
    """A local model dir: its config.json content and each weight file's size and mtime (hashing
    gigabytes of weights on every rerun would be slow); a hub name: the name."""
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        return f"hub:{name_or_path}"
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()
