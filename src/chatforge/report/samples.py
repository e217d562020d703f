"""The sample tables of an RL run: at each evaluation, the policy's greedy responses to the first held-out
prompts next to the SFT model's (evaluation step 0) for the same prompts, with the proxy reward and each
gold score (read from samples.jsonl)."""

from __future__ import annotations

from html import escape

from chatforge.report.data import Run, is_number

NO_VALUE = "\u2014"  # an em dash: no such prompt or score in the other evaluation


def render_samples(run: Run) -> str:
    """The run's sample section: one table per evaluation after step 0, the newest open; "" without samples.

    Each table row is one prompt: the SFT response with its scores, then the policy's with its scores and
    their change from SFT."""
    if not run.samples:
        return ""
    baseline = run.samples.get(0, [])
    later = sorted((s for s in run.samples if s != 0), reverse=True)
    golds = sorted({k for recs in run.samples.values() for r in recs for k in r if k.startswith("gold:")})
    parts = [
        "<h3>Sample responses (greedy, held-out prompts)</h3>",
        '<p class="note">The policy at each evaluation next to the SFT model (step 0) on the same prompts; '
        "reward is the proxy reward the policy was trained on, gold scores are independent checks.</p>",
    ]
    if not later:
        parts.append(_details("step 0 (SFT model)", _single_table(baseline, golds), is_open=True))
    for i, step in enumerate(later):
        title = f"step {step} vs SFT (step 0)" if baseline else f"step {step} (no step-0 samples to compare)"
        parts.append(_details(title, _paired_table(run.samples[step], baseline, golds, step), is_open=i == 0))
    return '<div class="samples">\n' + "\n".join(parts) + "\n</div>"


def _details(title: str, body: str, is_open: bool) -> str:
    return f"<details{' open' if is_open else ''}>\n<summary>{escape(title)}</summary>\n{body}\n</details>"


def _single_table(records: list[dict], golds: list[str]) -> str:
    rows = [[_text(r["prompt"]), _response(r, golds)] for r in records]
    return _table(["prompt", "SFT model (step 0)"], rows)


def _paired_table(records: list[dict], baseline: list[dict], golds: list[str], step: int) -> str:
    """Rows matched by prompt text (in order, so repeated prompts pair up one to one)."""
    unmatched: dict[str, list[dict]] = {}
    for rec in baseline:
        unmatched.setdefault(rec["prompt"], []).append(rec)
    rows = []
    for rec in records:
        matches = unmatched.get(rec["prompt"])
        base = matches.pop(0) if matches else None
        sft = _response(base, golds) if base else f'<td class="text">{NO_VALUE}</td>'
        rows.append([_text(rec["prompt"]), sft, _response(rec, golds, base)])
    return _table(["prompt", "SFT model (step 0)", f"policy at step {step}"], rows)


def _text(value: str) -> str:
    return f'<td class="text">{escape(value)}</td>'


def _response(rec: dict, golds: list[str], base: dict | None = None) -> str:
    """A response cell: the text, then its reward and gold scores (with the change from `base`, the SFT
    model's response to the same prompt)."""
    names = [("reward", "reward")] + [(g, g.removeprefix("gold:")) for g in golds]
    scores = " &middot; ".join(
        f"{escape(title)} {_score(rec.get(key), (base or {}).get(key))}" for key, title in names
    )
    text = escape(rec["response"]) if rec["response"] else '<span class="empty">(empty response)</span>'
    return f'<td><div class="text">{text}</div><div class="scores">{scores}</div></td>'


def _score(value, before=None) -> str:
    """A score; with the SFT score `before`, also the change, marked up or down."""
    if not is_number(value):
        return NO_VALUE
    if not is_number(before) or value == before:
        return f"{value:.3g}"
    kind = "up" if value > before else "down"
    return f'{value:.3g} <span class="{kind}">({value - before:+.3g})</span>'


def _table(head: list[str], rows: list[list[str]]) -> str:
    header = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    return f'<table class="samples">\n<tr>{header}</tr>\n{body}\n</table>'
