"""Which step-3 evaluation's actor is exported as the final model.

With a gold signal (eval.gold) the best evaluation by it wins; with only rule rewards (no reward model),
the best by the held-out reward. Otherwise the learned reward is all there is, and it is exactly what a
hacking policy inflates. The KL to the reference splits into two parts: how much less likely the SFT model
finds the policy's responses than its own (drift), and how much more certain the policy got (sharpening).
Learning what the SFT model already half-knew is mostly sharpening; saying what the SFT model would not (a
reward model's blind spot) is drift. So an evaluation only competes while the drift of its median response
is at most DRIFT_SHARE of the KL target. Among the evaluations that may compete, the latest within one
standard error of the best wins (`choose`). Pure functions of the evaluation records, so the choice can be
tested on hand-made inputs.
"""

from __future__ import annotations

import math

DRIFT_SHARE = 0.5
"""Share of algorithm.kl_target that the drift may take. Measured on three tasks (docs/rl-guards.md): every
evaluation of policies that hacked a shortcut reward model drifted >= 0.77 nats per response, those that
learned the task <= 0.19 (and mostly < 0), at the default target of 1 nat."""


def max_drift(kl_target: float | None) -> float | None:
    """The drift bound in nats per response; None (no bound, no choice) when the KL target is off."""
    return None if kl_target is None else DRIFT_SHARE * kl_target


def judged_kind(result: dict) -> str:
    """Which responses an evaluation is judged by: the sampled ones, the greedy ones when eval.samples is 0."""
    return "sampled" if "reward_sampled" in result else "greedy"


def drift_key(result: dict) -> str | None:
    """The median response's reference NLL: of the sampled responses (of the greedy ones without samples)."""
    for kind in ("sampled", "greedy"):
        if f"ref_nll_median_{kind}" in result:
            return f"ref_nll_median_{kind}"
    return None


def reference_drift(result: dict, baseline: dict) -> float | None:
    """Nats per response by which the reference (SFT) model finds this evaluation's median response less
    likely than that of the first evaluation (its own, at step 0); negative when the policy sharpens onto
    responses the SFT model rated likely. The median, because a few long odd samples would rule a mean.
    None when either record lacks the figure."""
    key = drift_key(result)
    if key is None or key not in baseline:
        return None
    return result[key] - baseline[key]


def export_key(result: dict, gold_key: str | None) -> str:
    """The figure evaluations compete by: the gold signal, else the held-out reward (sampled, or greedy
    without samples)."""
    return gold_key or f"reward_{judged_kind(result)}"


def may_compete(
    result: dict, baseline: dict, gold_key: str | None, bound: float | None, learned_reward: bool
) -> bool:
    """Whether this evaluation may be exported. Always with a gold signal, or when no reward model is part of
    the reward (rule rewards are checks: nothing learned to exploit, and RL on them may rightly find what
    the SFT model would not say); else only while the reference drift is at most bound (max_drift), and
    never with bound None (the last actor is exported)."""
    if gold_key is not None or not learned_reward:
        return True
    drift = reference_drift(result, baseline)
    return bound is not None and drift is not None and drift <= bound


def choose(best: dict, step: int, score: float, stderr: float) -> dict | None:
    """The export's new choice when this evaluation (of `step`) becomes it, else None.

    The latest evaluation within one standard error of the best score so far wins: held-out scores of a
    few hundred responses are noisy (a step-0 score that came out high by luck must not beat a trained
    policy that is as good), and among evaluations the figures cannot tell apart the later one has learned
    more from a signal that is trusted (gold, rules) or bounded (drift). `best` carries the top score and
    its standard error ("top", "top_stderr"); the SE of a difference of two means is their hypot.
    """
    top, top_se = best.get("top", best.get("score", -math.inf)), best.get("top_stderr", 0.0)
    if score >= top:
        top, top_se = score, stderr
    if score < top - math.hypot(stderr, top_se):
        return None
    return {"step": step, "score": score, "stderr": stderr, "top": top, "top_stderr": top_se}
