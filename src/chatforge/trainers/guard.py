"""The non-finite guard: a NaN/inf loss skips its step (on every rank) instead of poisoning the weights,
and too many in a row stop the run with the last good checkpoint kept."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger("chatforge")
MAX_BAD_STEPS = 3


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


class NonFiniteGuard:
    """Skip a step whose loss is NaN/inf on any rank; abort after `max_bad` in a row.

    All ranks must agree to skip, else ZeRO's collectives in backward would deadlock."""

    def __init__(self, what: str = "loss", max_bad: int = MAX_BAD_STEPS):
        self.what, self.max_bad = what, max_bad
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
        log.warning(
            "non-finite %s at step %d (%d in a row); skipping this batch", self.what, step, self.in_a_row
        )
        if self.in_a_row > self.max_bad:
            raise TrainingDiverged(
                f"the {self.what} was NaN/inf {self.in_a_row} times in a row (last at step {step}); stopped. "
                "The last good checkpoint is kept. Lower the learning rate or check the data."
            )
        return True


@contextlib.contextmanager
def zeroed_gradients(module: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every parameter gradient of a backward run inside is replaced by zeros (a skipped batch).

    A skipped batch still runs backward so ZeRO's gradient hooks stay in step on all ranks, but its
    `0 * loss` alone is not enough: where activations are NaN/inf, weight gradients are 0 * NaN = NaN
    and would poison the weights. Tensor hooks run before DeepSpeed's accumulation/reduction hooks."""
    if not enabled:
        yield
        return
    handles = [p.register_hook(torch.zeros_like) for p in module.parameters() if p.requires_grad]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def finite_or_zero(loss: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """A zero loss connected to the graph of `tensors` (NaN-free), to backward in place of a skipped loss."""
    return 0.0 * sum(t.nan_to_num(0.0, 0.0, 0.0).sum() for t in (loss, *tensors))
