"""Pieces every trainer shares: run-dir layout, metrics, progress, seeding, data order, NaN guard,
checkpoint rotation. No DeepSpeed here: trainers reach it only through `chatforge.engine`."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("chatforge")


@dataclass(frozen=True)
class RunDir:
    """Layout of one training run: <output_dir>/{model,checkpoints,tb,metrics.jsonl,config.yaml}."""

    root: Path
    final_model: Path

    @classmethod
    def create(cls, output_dir: str, final_model_dir: str | None = None) -> RunDir:
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, Path(final_model_dir) if final_model_dir else root / "model")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def done_marker(self) -> Path:
        return self.root / "DONE"


class MetricsLogger:
    """One JSON line per record in metrics.jsonl (phase, step, wall time, values) plus tensorboard.

    The jsonl file is the source of truth for reports; every line is flushed as it is written, so a
    crash loses nothing that was logged."""

    def __init__(self, run: RunDir, is_main: bool, tensorboard: bool = True):
        self.is_main = is_main
        self.start = time.time()
        self._file = open(run.metrics, "a") if is_main else None  # noqa: SIM115 - lives as long as the run
        self._tb = None
        if is_main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run.root / "tb"))
            except ImportError:  # tensorboard is optional at run time
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, phase: str, step: int, values: dict[str, float]) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        record = {"phase": phase, "step": step, "time": round(time.time() - self.start, 3), **clean}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(f"{phase}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])


def epoch_batches(n_rows: int, batch: int, rank: int, world: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's micro-batches of row indices for one epoch: a seeded permutation, dealt round-robin,
    cut so every rank gets the same number of full batches (collectives stay in lockstep)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=g).tolist()
    per_rank = n_rows // world // batch * batch
    mine = order[rank::world][:per_rank]
    return [mine[i : i + batch] for i in range(0, per_rank, batch)]


def eval_batches(n_rows: int, batch: int, rank: int, world: int) -> Iterator[list[int]]:
    """Every eval row exactly once over all ranks (the last batches may be short or empty)."""
    mine = list(range(rank, n_rows, world))
    for i in range(0, len(mine), batch):
        yield mine[i : i + batch]


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class NonFiniteGuard:
    """Skip a step whose loss is NaN/inf on any rank; abort after `max_bad` in a row.

    All ranks must agree to skip, else ZeRO's collectives in backward would deadlock."""

    def __init__(self, max_bad: int):
        self.max_bad = max_bad
        self.in_a_row = 0
        self.total = 0

    def should_skip(self, loss: torch.Tensor, step: int) -> bool:
        from chatforge.engine import all_reduce_sum

        bad = all_reduce_sum(torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device))
        if bad.item() == 0:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        log.warning("non-finite loss at step %d (%d in a row); skipping this batch", step, self.in_a_row)
        if self.in_a_row > self.max_bad:
            raise TrainingDiverged(
                f"loss was NaN/inf {self.in_a_row} times in a row (last at step {step}); stopped. "
                "The last good checkpoint is kept. Lower optim.learning_rate, check the data, "
                "or raise train.max_bad_steps."
            )
        return True


@contextlib.contextmanager
def zeroed_gradients(module: torch.nn.Module) -> Iterator[None]:
    """Every parameter gradient of a backward run inside is replaced by zeros (a skipped batch).

    A skipped batch still runs backward so ZeRO's gradient hooks stay in step on all ranks, but its
    `0 * loss` alone is not enough: where activations are NaN/inf, weight gradients are 0 * NaN = NaN
    and would poison the weights. Tensor hooks run before DeepSpeed's accumulation/reduction hooks."""
    handles = [p.register_hook(torch.zeros_like) for p in module.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def prune_checkpoints(ckpt_dir: Path, keep: int, is_main: bool) -> None:
    """Delete all but the newest `keep` checkpoint tags (the one `latest` names always survives)."""
    if not is_main or not ckpt_dir.is_dir():
        return
    latest = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")), key=_tag_step)
    for path in tags[: max(0, len(tags) - keep)]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def _tag_step(path: Path) -> int:
    digits = path.name.removeprefix("step")
    return int(digits) if digits.isdigit() else -1


def fault_injection_step() -> int | None:
    """CHATFORGE_FAULT_AT_STEP=N makes a trainer die hard right after optimizer step N (tests of resume)."""
    value = os.environ.get("CHATFORGE_FAULT_AT_STEP")
    return int(value) if value else None


def maybe_die(step: int) -> None:
    target = fault_injection_step()
    if target is not None and step == target:
        os._exit(17)  # no cleanup, like a killed process


class BatchSchedule:
    """Which rows each optimizer step uses on this rank, over epochs, with a resumable position.

    The order depends only on (seed, epoch, rank, world), so a resumed run sees the same batches as an
    uninterrupted one."""

    def __init__(self, n_rows: int, micro: int, accumulation: int, rank: int, world: int, seed: int):
        self.n_rows, self.micro, self.accumulation = n_rows, micro, accumulation
        self.rank, self.world, self.seed = rank, world, seed
        self.position = (0, 0)  # (epoch, micro-batch index within the epoch)

    def epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.n_rows, self.micro, self.rank, self.world, self.seed, epoch)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch(0)) // self.accumulation

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        total = epochs * self.steps_per_epoch
        return total if max_steps is None else min(total, max_steps)

    def windows(self) -> Iterator[list[list[int]]]:
        """Row indices of each micro-batch of each optimizer step, from the current position on."""
        epoch, start = self.position
        while True:
            batches = self.epoch(epoch)
            usable = len(batches) // self.accumulation * self.accumulation
            for i in range(start, usable, self.accumulation):
                self.position = (epoch, i + self.accumulation)
                yield batches[i : i + self.accumulation]
            epoch, start = epoch + 1, 0


def save_train_checkpoint(
    engine, run: RunDir, step: int, schedule: BatchSchedule, keep: int, extra=None
) -> None:
    """Engine state + loop position + RNG, tagged by step; older tags pruned to `keep`."""
    from chatforge.engine import barrier

    state = {"step": step, "position": list(schedule.position), "rng": rng_state(), **(extra or {})}
    engine.save_checkpoint(run.checkpoints, tag=f"step{step}", client_state=state)
    barrier()
    prune_checkpoints(run.checkpoints, keep, engine.dist.is_main)


def load_train_checkpoint(engine, run: RunDir, schedule: BatchSchedule) -> dict | None:
    """Restore engine, loop position and RNG from the latest checkpoint; None when there is none."""
    state = engine.load_checkpoint(run.checkpoints)
    if state is None:
        log.info("no checkpoint in %s; starting from scratch", run.checkpoints)
        return None
    schedule.position = tuple(state["position"])
    set_rng_state(state["rng"])
    log.info("resumed from step %d (epoch %d, batch %d)", state["step"], *schedule.position)
    return state


def pad_collective_forwards(zero_stage: int, dp, n_rows: int, micro: int, forward_dummy) -> None:
    """Under ZeRO-3 every forward is collective, so a rank with fewer eval batches than the busiest
    one runs dummy forwards until all ranks have run the same number. `dp` (rank, world_size) is the
    data-parallel axis the eval rows are dealt over."""
    if zero_stage != 3 or dp.world_size == 1:
        return
    mine = len(list(eval_batches(n_rows, micro, dp.rank, dp.world_size)))
    most = len(list(eval_batches(n_rows, micro, 0, dp.world_size)))
    for _ in range(most - mine):
        forward_dummy()


def mark_done(run: RunDir, is_main: bool, step: int, final: dict) -> None:
    if is_main:
        run.done_marker.write_text(json.dumps({"step": step, **final}))


def build_splits_or_fail(n_train: int, steps_per_epoch: int, global_batch: int, what: str) -> None:
    if steps_per_epoch == 0:
        raise ValueError(
            f"the {what} split has {n_train} rows: too few for one optimizer step of {global_batch} rows "
            "over all ranks; lower train.micro_batch_size / train.gradient_accumulation_steps or add data"
        )
