"""Resumable checkpoints: the engines' states, the loop state every rank shares, and each rank's own state.

DeepSpeed writes `client_state` from rank 0 only, so a rank's own RNG streams and generators (its sampler
draws differ from the others') go to `ranks/<tag>/rank<R>.pt`, written by that rank before the commit point:
the first engine's `latest` pointer, written last. A crash at any moment leaves `latest` on a complete
checkpoint. `CHATFORGE_FAULT_AT_STEP=N` makes a trainer die hard after step N (resume tests).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from pathlib import Path

import torch

from .run_dir import RunDir, log


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG streams (python, numpy, torch CPU and accelerator) and named generators."""
    import numpy as np

    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, gen in (generators or {}).items():
        gen.set_state(state["generators"][name])


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class DiskFullError(OSError):
    """The disk filled up while writing a checkpoint or a model; the message names the dir, what was being
    written, and the checkpoint that is kept (the partial one is removed to give the space back)."""

    described = True  # chatforge.cli.describe_error prints the message as it is

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """ENOSPC/EDQUOT from Python, or torch.save's 'file write failed' (it drops the errno) on a full disk."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    if "No space left on device" in text:
        return True
    if isinstance(exc, RuntimeError) and "write failed" in text:
        probe = next((p for p in [where, *where.parents] if p.exists()), Path("/"))
        return shutil.disk_usage(probe).free < (64 << 20)
    return False


@contextlib.contextmanager
def naming_a_full_disk(run: RunDir, what: str, engine_name: str, partial_tag: str | None = None):
    """Turn a full disk while writing `what` into a DiskFullError naming the kept checkpoint."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, DiskFullError) or not is_disk_full(exc, run.root):
            raise
        kept = latest_tag(run, engine_name)
        if partial_tag is not None and partial_tag != kept:
            for path in run.checkpoints.glob(f"*/{partial_tag}"):
                shutil.rmtree(path, ignore_errors=True)
        keeps = (
            f"the last complete checkpoint ({kept}, in {run.checkpoints}) is kept"
            if kept
            else ("there is no complete checkpoint yet")
        )
        raise DiskFullError(f"no space left on {run.root} while writing {what}; {keeps}") from exc


def save_checkpoint(
    run: RunDir, engines: dict, tag: str, shared: dict, generators: dict | None = None,
    keep: tuple[str, ...] = (),
) -> None:  # fmt: skip
    """Every engine's state (the first one last: its `latest` is the commit point), `shared` (the loop
    state, the same on every rank) and each rank's RNG state. Older tags are pruned except `keep`. A full
    disk raises DiskFullError (the partial tag is removed; `latest` still names a complete checkpoint)."""
    names = list(engines)
    with naming_a_full_disk(run, f"checkpoint {tag}", names[0], partial_tag=tag):
        _save_checkpoint(run, engines, tag, shared, generators, keep)


def _save_checkpoint(run: RunDir, engines: dict, tag: str, shared: dict, generators, keep) -> None:
    from chatforge.engine import barrier

    names = list(engines)
    for name in names[1:]:
        engines[name].save_checkpoint(run.checkpoints / name, tag=tag)
    first = engines[names[0]]
    rank_file = run.checkpoints / "ranks" / tag / f"rank{first.dist.rank}.pt"
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(generators), rank_file.with_suffix(".tmp"))
    os.replace(rank_file.with_suffix(".tmp"), rank_file)
    barrier()
    first.save_checkpoint(run.checkpoints / names[0], tag=tag, client_state=shared)
    barrier()
    if first.dist.is_main:
        for name in [*names, "ranks"]:
            prune_tags(run.checkpoints / name, keep=(tag, *keep))


def load_checkpoint(
    run: RunDir, engines: dict, generators: dict | None = None, tag: str | None = None
) -> dict | None:
    """Restore the latest (or `tag`) checkpoint into every engine and this rank's RNG state; returns the
    shared loop state, or None when there is no checkpoint."""
    names = list(engines)
    first = engines[names[0]]
    shared = first.load_checkpoint(run.checkpoints / names[0], tag=tag)
    if shared is None:
        return None
    tag = tag or (run.checkpoints / names[0] / "latest").read_text().strip()
    for name in names[1:]:
        engines[name].load_checkpoint(run.checkpoints / name, tag=tag)
    rank_file = run.checkpoints / "ranks" / tag / f"rank{first.dist.rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint {tag} was written by a different number of processes; "
            "resume with the same process count, or start a new run (a new output dir)"
        )
    set_rng_state(torch.load(rank_file, weights_only=False), generators)
    log.info("resumed from checkpoint %s", tag)
    return shared


def latest_tag(run: RunDir, engine_name: str) -> str | None:
    path = run.checkpoints / engine_name / "latest"
    return path.read_text().strip() if path.is_file() else None


def prune_tags(ckpt_dir: Path, keep: tuple[str, ...]) -> None:
    """Delete every `step*` tag dir of `ckpt_dir` but those in `keep`."""
    if not ckpt_dir.is_dir():
        return
    for path in ckpt_dir.iterdir():
        if path.is_dir() and path.name.startswith("step") and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def maybe_die(step: int) -> None:
    """CHATFORGE_FAULT_AT_STEP=N: die hard right after step N, like a killed process (resume tests)."""
    value = os.environ.get("CHATFORGE_FAULT_AT_STEP")
    if value and int(value) == step:
        os._exit(17)
