"""Which step-3 evaluation's actor is exported as the final model.

With a gold signal (eval.gold) the best evaluation by it wins. Without one, the proxy reward is all there
is, and it is exactly what a hacking policy inflates. The KL to the reference splits into two parts: how
much less likely the SFT model finds the policy's responses than its own (drift), and how much more certain
the policy got (sharpening). Learning what the SFT model already half-knew is mostly sharpening; saying what
the SFT model would not (a reward model's blind spot) is drift. So an evaluation only competes while the
drift of its median response is at most DRIFT_SHARE of the KL target. Pure functions of the evaluation
records, so the choice can be tested on hand-made inputs.
"""

from __future__ import annotations

DRIFT_SHARE = 0.5
"""Share of algorithm.kl_target that the drift may take. Measured on three tasks (docs/rl-guards.md): every
evaluation of policies that hacked a shortcut reward model drifted >= 0.8 nats per response, those that
learned the task <= 0.15 (and mostly < 0), at the default target of 1 nat."""


def max_drift(kl_target: float | None) -> float | None:
    """The drift bound in nats per response; None (no bound, no choice) when the KL target is off."""
    return None if kl_target is None else DRIFT_SHARE * kl_target


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


def export_score(result: dict, baseline: dict, gold_key: str | None, bound: float | None) -> float | None:
    """The score this evaluation competes with for the export, None when it may not compete.

    The gold signal when there is one; else the proxy reward (sampled, or greedy without samples), only
    while the reference drift is at most bound (max_drift); bound None = no choice (the last actor is
    exported).
    """
    if gold_key is not None:
        return result[gold_key]
    drift = reference_drift(result, baseline)
    if bound is None or drift is None or drift > bound:
        return None
    kind = "sampled" if "reward_sampled" in result else "greedy"
    return result[f"reward_{kind}"]
