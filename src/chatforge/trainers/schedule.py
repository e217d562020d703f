"""Which rows each step uses on each rank: seeded epochs dealt over the data-parallel ranks, resumable."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from chatforge.data.errors import DataError


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

    def require_one_step(self, what: str) -> None:
        """A one-line error when the split cannot fill one optimizer step on every rank."""
        if self.steps_per_epoch == 0:
            global_batch = self.micro * self.accumulation * self.world
            raise DataError(
                f"the {what} split has {self.n_rows} training rows: too few for one optimizer step of "
                f"{global_batch} rows over all ranks. Fix: lower the batch size (batch.micro_batch_size, "
                "rollout.batch_size), give the step a larger share of the data, or add data"
            )


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


class BatchStream:
    """An endless, resumable stream of collated batches of `rows` (e.g. the PTX text of step 3)."""

    def __init__(self, rows, collate, micro: int, rank: int, world: int, seed: int, what: str):
        self.rows, self.collate = rows, collate
        self.schedule = BatchSchedule(len(rows), micro, 1, rank, world, seed)
        self.schedule.require_one_step(what)
        self._windows: Iterator | None = None

    def next(self) -> dict:
        if self._windows is None:
            self._windows = self.schedule.windows()
        (idx,) = next(self._windows)
        return self.collate([self.rows[j] for j in idx])

    @property
    def position(self) -> list[int]:
        return list(self.schedule.position)

    @position.setter
    def position(self, value: list[int]) -> None:
        self.schedule.position = tuple(value)
        self._windows = None
