"""What a step of `chatforge train` is made from, so a rerun can tell "the same run, resume it" from "another
run in the same dir". Each step's run dir keeps `made_from.json`: its settings and a fingerprint of every
input it reads from outside the pipeline (model dirs: config and weight file sizes/times; local data files:
a content hash). A rerun whose record differs refuses with the first difference and the fix."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from chatforge.config import ConfigError, to_dict

RECORD = "made_from.json"
RUN_ONLY = ("train.resume",)  # how the step is run, not what it is made from


class RerunError(ConfigError):
    """A rerun would reuse or resume a step that was made from other inputs."""


def made_from(step_cfg, name: str, internal: Path | None = None) -> dict:
    """{settings, inputs} of one step. Model dirs under `internal` (earlier steps' outputs) are not
    fingerprinted: they may not exist yet, and the earlier step's own record vouches for them."""
    settings = _flatten(to_dict(step_cfg))
    for key in RUN_ONLY:
        settings.pop(key, None)
    inputs = {f"data:{spec}": _data_fingerprint(spec) for spec in settings.get("data.datasets", [])}
    for spec in settings.get("ptx.datasets", []):
        inputs[f"data:{spec}"] = _data_fingerprint(spec)
    for key, value in settings.items():
        if key.endswith("name_or_path") or key == "reward.models":
            for path in value if isinstance(value, list) else [value]:
                if internal is None or not _inside(path, internal):
                    inputs[f"model:{path}"] = _model_fingerprint(path)
    return {"step": name, "settings": settings, "inputs": inputs}


def _inside(path: str, root: Path) -> bool:
    try:
        Path(path.rpartition("*")[0] or path).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def write_made_from(run_dir: Path, record: dict) -> None:
    tmp = run_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, run_dir / RECORD)


def check_rerun(run_dir: Path, name: str, record: dict, done: bool) -> None:
    """Raise RerunError when `run_dir` holds this step made (or being made) from other inputs."""
    path = run_dir / RECORD
    if not path.is_file():
        if done:
            raise RerunError(
                f"{run_dir} holds a finished '{name}' step without a record of its inputs (an older chatforge): "
                "use a new --output-dir, or --restart-from to redo it"
            )
        return
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
                what = "input" if section == "inputs" else "setting"
                return f"{what} {key} was {_short(a.get(key))}, now {_short(b.get(key))}"
    return None


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
    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with file.open("rb") as f:
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
