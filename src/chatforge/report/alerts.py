"""The warning banner at the top of a report: what an RL run's guard saw, in plain words.

Three records raise it: an eval record with `warnings` > 0 (the reward rose while diversity collapsed, the
median response's reference drift passed half the KL target, the KL passed 1.5x its target, or a gold
signal fell; metrics.jsonl holds only the count, so the banner states the numbers behind the checks against
the first evaluation), a `guard` record with `kl_limit_stop`, and one with `exported_step` (an earlier
evaluation than the last was exported)."""

from __future__ import annotations

import math
from html import escape

from chatforge.report.data import Run, is_number

HACKING = "possible reward hacking"


def run_alerts(run: Run) -> list[str]:
    """Plain-text sentences, one per evaluation that warned and one per KL-limit stop, in step order."""
    evals = _last_per_step(run, "eval")
    baseline = evals[min(evals)] if evals else {}
    out = []
    for step, rec in sorted(evals.items()):
        count = rec.get("warnings")
        if is_number(count) and count > 0:
            out.append(_warning_sentence(run.name, step, int(count), rec, baseline))
    for index, rec in enumerate(run.records):
        if rec.get("phase") != "guard":
            continue
        if is_number(rec.get("kl_limit_stop")) and rec["kl_limit_stop"] > 0:
            out.append(_kl_stop_sentence(run, index, rec))
        if is_number(rec.get("exported_step")):
            out.append(
                f"the exported model is the one of evaluation step {_fmt(rec['exported_step'])}, not the last "
                f"iteration's ({_fmt(rec.get('step'))}, kept in actor-last): later evaluations scored lower by "
                "the gold signal (or the held-out reward without one), or their responses drifted too far from "
                "what the SFT model would say."
            )
    return out


def render_banner(runs: list[Run]) -> str:
    """The banner, or "" when no run raised an alert."""
    items = [(run.name, text) for run in runs for text in run_alerts(run)]
    if not items:
        return ""
    lines = "\n".join(
        f'<li><a href="#run-{escape(name)}">{escape(name)}</a>: {escape(text)}</li>' for name, text in items
    )
    advice = ""
    if any(text.startswith(HACKING) for _, text in items):
        advice = (
            "<p>A policy trained against a learned reward can learn the reward's mistakes instead of the task: "
            "read its sample responses (in the run's section) before using it, and compare the gold scores.</p>\n"
        )
    return (
        '<div class="banner" role="alert">\n<strong>Check before trusting these models</strong>\n'
        f"<ul>\n{lines}\n</ul>\n{advice}</div>"
    )


def _last_per_step(run: Run, phase: str) -> dict[int, dict]:
    """step -> the last record of `phase` at that step (a resumed run logs a step again)."""
    out = {}
    for rec in run.records:
        if rec.get("phase") == phase and is_number(rec.get("step")):
            out[int(rec["step"])] = rec
    return out


def _warning_sentence(name: str, step: int, count: int, rec: dict, base: dict) -> str:
    kind = "sampled" if is_number(rec.get("reward_sampled")) else "greedy"
    facts = [_change("the proxy reward", rec.get(f"reward_{kind}"), base.get(f"reward_{kind}"))]
    # The collapse check judges greedy replies (the same reply to different questions), whatever `kind`.
    facts.append(_change("the share of prompts with a greedy reply of their own", *_own(rec, base), _percent))
    facts.append(
        _change(
            "distinct-2 of the greedy replies", rec.get("distinct_2_greedy"), base.get("distinct_2_greedy")
        )
    )
    for key in _gold_keys(rec, kind):
        facts.append(_change(key.removesuffix(f"_{kind}"), rec[key], base.get(key)))
    drift = rec.get("ref_drift")
    if is_number(drift):
        facts.append(
            f"the SFT model finds the median {kind} response {_fmt(abs(drift))} nats "
            f"{'less' if drift >= 0 else 'more'} likely than its own"
        )
    kl = rec.get(f"kl_{kind}")
    if is_number(kl):
        facts.append(f"the KL to the reference is {_fmt(kl)} nats per response")
    plural = "s" if count > 1 else ""
    return (
        f"{HACKING} at evaluation step {step} ({count} warning{plural}): "
        + "; ".join(f for f in facts if f)
        + f" (against step {_fmt(base.get('step', 0))}; reward, gold and KL of the {kind} responses)."
    )


def _own(rec: dict, base: dict) -> tuple:
    """(now, before): the share of held-out prompts whose greedy reply no other prompt got."""
    return tuple(
        1 - r["identical_share_greedy"] if is_number(r.get("identical_share_greedy")) else None
        for r in (rec, base)
    )


def _gold_keys(rec: dict, kind: str) -> list[str]:
    return sorted(k for k in rec if k.startswith("gold:") and k.endswith(f"_{kind}"))


def _change(label: str, now, before, fmt=None) -> str:
    """'LABEL rose from B to N' (fell, stayed at), 'LABEL is N' without a before, '' without a now."""
    fmt = fmt or _fmt
    if not is_number(now):
        return ""
    if not is_number(before):
        return f"{label} is {fmt(now)}"
    if now == before:
        return f"{label} stayed at {fmt(now)}"
    return f"{label} {'rose' if now > before else 'fell'} from {fmt(before)} to {fmt(now)}"


def _percent(value: float) -> str:
    return f"{value:.0%}"


def _kl_stop_sentence(run: Run, index: int, rec: dict) -> str:
    """The stop, the limit (from config.yaml when readable) and the step the run went back to (the first
    eval record after the guard record: the final evaluation of the restored checkpoint)."""
    kl, step = rec.get("kl"), rec.get("step")
    limit = _kl_limit(run.config_text)
    text = f"the KL to the reference reached {_fmt(kl)} nats per response at iteration {_fmt(step)}"
    text += f", past algorithm.kl_limit={_fmt(limit)}" if limit is not None else ", past algorithm.kl_limit"
    after = [r for r in run.records[index + 1 :] if r.get("phase") == "eval" and is_number(r.get("step"))]
    back = f" (step {_fmt(after[0]['step'])})" if after else ""
    return (
        f"{text}. The run stopped early and went back to its last checkpoint within the KL budget{back}: "
        "beyond that point the reward model's scores were no longer trusted."
    )


def _kl_limit(config_text: str | None) -> float | None:
    """algorithm.kl_limit of a run's config.yaml, or None when it cannot be read."""
    if not config_text:
        return None
    import yaml

    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError:
        return None
    algorithm = config.get("algorithm") if isinstance(config, dict) else None
    limit = algorithm.get("kl_limit") if isinstance(algorithm, dict) else None
    return float(limit) if is_number(limit) else None


def _fmt(value) -> str:
    if not is_number(value):
        return "?"
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.3g}"
