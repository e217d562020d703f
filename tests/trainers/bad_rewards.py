"""Reward functions that break the contract (tests/trainers/test_ppo.py)."""


def nan_score(prompts, responses, **_fields):
    return [float("nan")] * len(responses)


def too_few(prompts, responses, **_fields):
    return [1.0]
