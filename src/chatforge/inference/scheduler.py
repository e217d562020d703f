"""Concurrent requests decoded together: one worker thread runs batches of waiting replies.

Why: a decode step of one row costs nearly as much as a step of many rows (the weights are read once per
step either way), so serving requests one at a time wastes most of the hardware under load.

The worker takes the oldest waiting reply and every other waiting reply with the same sampling settings
(`_batch_key`), up to `max_batch_size`, left-pads their prompts into one `(B, P)` batch and runs
`chatforge.generation`'s decode loop for the longest max_new_tokens among them. Each row ends on its own
(EOS, its stop strings, its max_new_tokens, or its client going away) and its caller gets its Completion at
once; the batch stops when every row has ended. Replies that arrive meanwhile wait for the next batch.

What stays reproducible: greedy rows do not depend on their batch (a padded row computes what it computes
alone, up to float rounding). A sampled reply with a `seed` is decoded alone, since the decode loop draws
every row from one generator: its text equals `ChatModel.chat(..., seed=...)`. Unseeded sampled replies
share batches and are random, as before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from chatforge.generation.engine import _decode_steps

from .chat_model import ChatModel, GenerationJob
from .reply import ReplyBuilder

log = logging.getLogger(__name__)

Deliver = Callable[[str, Any], None]
"""Called on the worker thread with ("delta", str), then ("done", Completion) or ("error", Exception)."""


@dataclass
class PendingReply:
    """A submitted job; `cancel()` drops it (before or during its batch) when its client has gone."""

    job: GenerationJob
    deliver: Deliver
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    """Its Completion (or error) was delivered."""

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class SchedulerStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    cancelled: int = 0
    """Replies dropped, waiting or mid-batch, because their client went away."""
    last_batch_s: float = 0.0
    """Seconds the last batch took to decode."""


def _batch_key(job: GenerationJob) -> tuple:
    """Replies with equal keys can share one decode (one GenerationConfig, one random generator)."""
    c = job.config
    if not c.do_sample:
        return ("greedy", c.repetition_penalty)
    if job.seed is not None:
        return ("seeded", id(job))  # alone: its own generator gives its own reproducible draws
    return ("sampled", c.temperature, c.top_p, c.top_k, c.repetition_penalty)


class _Row:
    """One reply inside a running batch."""

    def __init__(self, pending: PendingReply, builder: ReplyBuilder, stats: SchedulerStats) -> None:
        self.pending, self.builder, self.stats, self.ended = pending, builder, stats, False

    def push(self, token: int) -> None:
        if self.pending.cancelled.is_set():
            self.ended = True
            self.stats.cancelled += 1
            return
        delta = self.builder.push(token)
        if delta:
            self.pending.deliver("delta", delta)
        if self.builder.done:
            self.end()

    def end(self) -> None:
        self.ended = True
        tail, completion = self.builder.finish()
        if tail:
            self.pending.deliver("delta", tail)
        self.pending.finished = True
        self.pending.deliver("done", completion)


class BatchScheduler:
    """Runs the jobs submitted from any thread in batches on one worker thread.

    max_batch_size: rows per decode at most (1 = one reply at a time, the server's old behaviour).
    batch_wait_s: before a batch, wait up to this long (and at most half the previous batch's decode time)
    until as many replies are waiting as were in flight (running or waiting) during the previous batch.
    Clients that resubmit as soon as they get their reply then land in one batch, instead of splitting into
    a batch of the early ones and one of the rest; with one client at a time nothing is ever waited for.
    """

    def __init__(self, chat_model: ChatModel, max_batch_size: int = 16, batch_wait_s: float = 0.05) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.chat_model = chat_model
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.stats = SchedulerStats()
        self._waiting: deque[PendingReply] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._peak_in_flight = 0
        self._worker: threading.Thread | None = None

    def submit(self, job: GenerationJob, deliver: Deliver) -> PendingReply:
        pending = PendingReply(job, deliver)
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="chatforge-batches", daemon=True)
                self._worker.start()
            self._waiting.append(pending)
            self._cond.notify()
        return pending

    def close(self) -> None:
        """Stop the worker after its current batch; waiting replies get an error."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify()
        for pending in left:
            pending.deliver("error", RuntimeError("the server is shutting down"))
        if self._worker is not None:
            self._worker.join(timeout=30)

    # --- worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._decode(batch)
            except Exception as exc:  # a failed batch fails its unfinished replies, never the worker
                log.exception("batched generation failed")
                for pending in batch:
                    if not pending.finished:
                        pending.finished = True
                        pending.deliver("error", exc)

    def _next_batch(self) -> list[PendingReply] | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            target = min(self.max_batch_size, self._peak_in_flight)
            deadline = time.monotonic() + min(self.batch_wait_s, self.stats.last_batch_s / 2)
            while not self._closed and len(self._waiting) < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if self._closed:
                return None
            batch = self._take()
            self._peak_in_flight = len(batch) + len(self._waiting)
            log.debug("batch of %d (target %d, %d left waiting)", len(batch), target, len(self._waiting))
            return batch

    def _take(self) -> list[PendingReply]:
        """The oldest reply and the waiting replies that fit in its batch (FIFO; never starves the oldest)."""
        for pending in [p for p in self._waiting if p.cancelled.is_set()]:
            self._waiting.remove(pending)
            self.stats.cancelled += 1
        if not self._waiting:
            return []
        key = _batch_key(self._waiting[0].job)
        batch: list[PendingReply] = []
        for pending in self._waiting:
            if len(batch) == self.max_batch_size:
                break
            if _batch_key(pending.job) == key and self._fits([*batch, pending]):
                batch.append(pending)
        for pending in batch:
            self._waiting.remove(pending)
        return batch

    def _fits(self, batch: list[PendingReply]) -> bool:
        """Every row runs for the longest max_new_tokens: its positions must stay within the model's."""
        limit = self.chat_model.max_positions
        longest = max(p.job.config.max_new_tokens for p in batch)
        return limit is None or all(len(p.job.prompt_ids) + longest <= limit for p in batch)

    def _decode(self, batch: list[PendingReply]) -> None:
        if not batch:
            return
        m = self.chat_model
        rows = [_Row(p, m.new_reply(p.job), self.stats) for p in batch]
        input_ids, attention_mask = m.left_pad([p.job.prompt_ids for p in batch])
        # Stop strings are checked per row by its ReplyBuilder; the loop only needs the longest budget.
        config = replace(
            batch[0].job.config,
            max_new_tokens=max(p.job.config.max_new_tokens for p in batch),
            stop_strings=[],
        )
        generator = m.seeded_generator(batch[0].job.seed) if len(batch) == 1 else None
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        started = time.monotonic()
        with m.lock:
            steps = _decode_steps(
                m.model, input_ids, attention_mask, config, m.eos_token_id, m.pad_token_id, None, generator
            )
            try:
                for step in steps:
                    for row, token in zip(rows, step.tokens.tolist()):
                        if not row.ended:
                            row.push(token)
                    running = sum(not row.ended for row in rows)
                    self._peak_in_flight = max(self._peak_in_flight, running + len(self._waiting))
                    if not running:
                        break
            finally:
                steps.close()
        self.stats.last_batch_s = time.monotonic() - started
        # Every row has ended by now (the loop runs to the longest budget); a row that had not would leave
        # its client waiting forever, so it is ended rather than trusted.
        for row in rows:
            if not row.ended:
                row.end()
