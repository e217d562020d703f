"""How varied a policy's responses are: the first sign of reward hacking is a policy that gives one reply to
every question. Responses are token-id sequences; all functions are pure."""

from __future__ import annotations

from collections.abc import Sequence


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """distinct-n (Li et al. 2016): unique n-grams / all n-grams over every response; 0 with no n-gram."""
    grams = [tuple(r[i : i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def identical_share(responses: Sequence[Sequence[int]]) -> float:
    """Share of responses that repeat an earlier one: 0 when all differ, (N - 1) / N when all are equal."""
    if not responses:
        return 0.0
    return 1.0 - len({tuple(r) for r in responses}) / len(responses)
