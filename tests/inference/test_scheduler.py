"""BatchScheduler: concurrent replies decoded in one batch equal the replies decoded alone."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from chatforge.inference import BatchScheduler, Completion


class Collector:
    """A `deliver` callback that records one reply's deltas and its end."""

    def __init__(self) -> None:
        self.deltas: list[str] = []
        self.completion: Completion | None = None
        self.error: Exception | None = None
        self.ended = threading.Event()

    def __call__(self, kind: str, value: Any) -> None:
        if kind == "delta":
            self.deltas.append(value)
            return
        self.completion, self.error = (value, None) if kind == "done" else (None, value)
        self.ended.set()

    def wait(self) -> Completion:
        assert self.ended.wait(120), "the reply never ended"
        if self.error is not None:
            raise self.error
        assert self.completion is not None and "".join(self.deltas) == self.completion.text
        return self.completion


def _prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {i} + {i * 7 % 13}? " * (1 + i % 3)}]


def _run_together(chat_model, scheduler, requests: list[tuple[list, dict]]) -> list[Completion]:
    """Submit every request while the model is busy, so that they wait and are batched together."""
    collectors = [Collector() for _ in requests]
    jobs = [chat_model.prepare(messages, **gen) for messages, gen in requests]
    with chat_model.lock:  # the worker takes the first job and blocks; the rest queue up behind it
        scheduler.submit(jobs[0], collectors[0])
        time.sleep(0.2)
        for job, collector in zip(jobs[1:], collectors[1:]):
            scheduler.submit(job, collector)
    return [c.wait() for c in collectors]


@pytest.fixture
def scheduler(chat_model):
    s = BatchScheduler(chat_model, max_batch_size=16, batch_wait_s=0.0)
    yield s
    s.close()


def test_greedy_batch_equals_requests_alone(chat_model, scheduler):
    # Different prompt lengths, budgets and stop strings; rows end on their own.
    requests = [(_prompt(i), {"temperature": 0, "max_new_tokens": 4 + i % 5}) for i in range(10)]
    alone = [chat_model.complete(m, **g) for m, g in requests]
    stop = alone[3].text[2:4]
    requests[3][1]["stop"] = [stop]
    alone[3] = chat_model.complete(*requests[3][:1], **requests[3][1])
    assert alone[3].finish_reason == "stop" and len({c.text for c in alone}) == len(alone)
    together = _run_together(chat_model, scheduler, requests)
    assert together == alone
    assert scheduler.stats.largest_batch == len(requests) - 1 and scheduler.stats.batches == 2


def test_seeded_sampling_stays_reproducible(chat_model, scheduler):
    sampled = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 12}
    requests = [(_prompt(i), {**sampled, "seed": i}) for i in range(4)]
    requests += [(_prompt(i), sampled) for i in range(4, 8)]  # unseeded: batched together
    together = _run_together(chat_model, scheduler, requests)
    for (messages, gen), completion in zip(requests[:4], together):
        assert completion == chat_model.complete(messages, **gen)
    assert all(c.completion_tokens <= 12 for c in together[4:])
    # One batch per seeded reply, and the unseeded ones shared one batch.
    assert scheduler.stats.batches == 5 and scheduler.stats.largest_batch == 4


def test_one_at_a_time_mode(chat_model):
    scheduler = BatchScheduler(chat_model, max_batch_size=1)
    try:
        requests = [(_prompt(i), {"temperature": 0, "max_new_tokens": 5}) for i in range(4)]
        assert _run_together(chat_model, scheduler, requests) == [
            chat_model.complete(*r[:1], **r[1]) for r in requests
        ]
        assert (scheduler.stats.batches, scheduler.stats.largest_batch) == (4, 1)
    finally:
        scheduler.close()


def test_a_cancelled_row_leaves_the_others_intact(chat_model, scheduler):
    requests = [(_prompt(i), {"temperature": 0, "max_new_tokens": 8}) for i in range(4)]
    jobs = [chat_model.prepare(m, **g) for m, g in requests]
    collectors = [Collector() for _ in jobs]
    with chat_model.lock:
        pending = [scheduler.submit(job, c) for job, c in zip(jobs, collectors)]
        pending[1].cancel()
    assert not collectors[1].ended.wait(1)  # a cancelled reply gets nothing
    assert scheduler.stats.cancelled == 1
    for i in (0, 2, 3):
        assert collectors[i].wait() == chat_model.complete(*requests[i][:1], **requests[i][1])


def test_rows_whose_positions_would_overflow_are_not_batched(chat_model, scheduler):
    long_prompt = [{"role": "user", "content": " 42" * 480}]
    room = chat_model.max_positions - len(chat_model.encode(long_prompt))
    assert 0 < room < 100
    requests = [
        (_prompt(0), {"temperature": 0, "max_new_tokens": 2}),  # taken alone while the rest queue
        (long_prompt, {"temperature": 0, "max_new_tokens": room}),
        (_prompt(1), {"temperature": 0, "max_new_tokens": 100}),  # would push the long row past 512
        (_prompt(2), {"temperature": 0, "max_new_tokens": room}),
    ]
    together = _run_together(chat_model, scheduler, requests)
    assert together == [chat_model.complete(*r[:1], **r[1]) for r in requests]
    # [first], [long, third] (fits), [second] (its 100 tokens do not fit next to the long prompt).
    assert (scheduler.stats.batches, scheduler.stats.largest_batch) == (3, 2)


def test_a_failing_batch_fails_its_replies_and_the_worker_survives(chat_model, scheduler, monkeypatch):
    job = chat_model.prepare(_prompt(0), temperature=0, max_new_tokens=3)
    broken = Collector()
    monkeypatch.setattr(chat_model, "left_pad", lambda prompts: (_ for _ in ()).throw(RuntimeError("boom")))
    scheduler.submit(job, broken)
    with pytest.raises(RuntimeError, match="boom"):
        broken.wait()
    monkeypatch.undo()
    fine = Collector()
    scheduler.submit(job, fine)
    assert fine.wait() == chat_model.complete(_prompt(0), temperature=0, max_new_tokens=3)


@pytest.mark.parametrize("wait", [0.0, 5.0])
def test_replies_arriving_in_a_burst_are_gathered(chat_model, wait):
    """After a batch of 3 rows, 3 replies arriving a little apart form one batch only with a wait."""
    scheduler = BatchScheduler(chat_model, max_batch_size=8, batch_wait_s=wait)
    try:
        requests = [(_prompt(i), {"temperature": 0, "max_new_tokens": 160}) for i in range(4)]
        _run_together(chat_model, scheduler, requests)  # batches [0], [1, 2, 3]
        # The window is half the last batch's time: at least 1 s here, so that it is far above scheduling
        # jitter however fast this box decodes (or early the replies end). The worker records the time just
        # after the replies end: let it, then raise it.
        time.sleep(0.2)
        scheduler.stats.last_batch_s = max(scheduler.stats.last_batch_s, 1.0)
        before = scheduler.stats.batches
        gap = max(0.05, scheduler.stats.last_batch_s / 8)  # 2 gaps: a quarter of the last batch's time
        collectors = [Collector() for _ in range(3)]
        for i, collector in enumerate(collectors):
            scheduler.submit(chat_model.prepare(_prompt(i + 10), temperature=0, max_new_tokens=4), collector)
            time.sleep(gap)
        for collector in collectors:
            collector.wait()
        assert (scheduler.stats.batches - before == 1) == (wait > 0)
    finally:
        scheduler.close()
