"""Built-in rule rewards, used like any `reward.functions` entry (`module:function*weight`)."""

from __future__ import annotations


def unfinished(prompts, responses, finished, **_row_fields) -> list[float]:
    """1.0 for a response that ended without an end-of-turn token or stop string (it hit
    rollout.max_new_tokens), else 0.0. With a negative weight it is the missing-EOS penalty:
    `chatforge.rewards.rules:unfinished*-1.0` (a policy must not win by never ending its reply)."""
    return [0.0 if done else 1.0 for done in finished]
