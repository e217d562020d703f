"""Which curves a report draws. A panel lists (phase, metric) pairs; it is drawn for any run that
logged at least one of them, so the same list serves SFT, reward and PPO runs alike."""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.report.data import Run
from chatforge.report.svg import Series, line_chart, stacked_bar_chart


@dataclass(frozen=True)
class Panel:
    """One chart: `lines` are (phase, metric, legend label)."""

    key: str
    title: str
    lines: tuple[tuple[str, str, str], ...]
    log_y: bool = False
    smooth: bool = False  # EMA overlay: for per-step train values, which are noisy
    stacked: bool = False


PANELS = (
    Panel("loss", "Loss", (("train", "loss", "train"), ("eval", "loss", "eval")), smooth=True),
    Panel("perplexity", "Perplexity (eval, log scale)", (("eval", "perplexity", "eval"),), log_y=True),
    Panel(
        "accuracy",
        "Accuracy (chosen > rejected)",
        (("train", "accuracy", "train"), ("eval", "accuracy", "eval")),
        smooth=True,
    ),
    Panel(
        "scores",
        "Reward scores and margin (eval)",
        (
            ("eval", "chosen_mean", "chosen"),
            ("eval", "rejected_mean", "rejected"),
            ("eval", "margin", "margin"),
        ),
    ),
    Panel(
        "reward",
        "Reward",
        (
            ("train", "reward", "rollouts"),
            ("eval", "reward_sampled", "eval (sampled)"),
            ("eval", "reward_greedy", "eval (greedy)"),
        ),
        smooth=True,
    ),
    Panel(
        "gold",
        "Gold signal vs proxy reward (eval)",
        (("eval", "gold:*", ""), ("eval", "reward_sampled", "proxy reward (sampled)")),
    ),
    Panel(
        "kl",
        "KL to the reference policy (nats per response)",
        (("train", "kl", "rollouts"), ("eval", "kl_sampled", "eval (sampled)")),
        smooth=True,
    ),
    Panel(
        "diversity",
        "Response diversity (eval)",
        (
            ("eval", "distinct_2_sampled", "distinct-2 (sampled)"),
            ("eval", "identical_share_greedy", "identical share (greedy)"),
        ),
    ),
    Panel(
        "ref_drift",
        "Reference drift: nats the SFT model finds the median response less likely than its own (eval)",
        (("eval", "ref_drift", "drift"),),
    ),
    Panel("kl_coef", "KL coefficient", (("train", "kl_coef", "kl_coef"),)),
    Panel(
        "response_length", "Response length (tokens)", (("train", "response_length", "mean"),), smooth=True
    ),
    Panel("entropy", "Policy entropy", (("train", "entropy", "entropy"),), smooth=True),
    Panel(
        "policy_loss",
        "Policy loss",
        (("train", "policy_loss", "policy"), ("train", "ptx_loss", "ptx")),
        smooth=True,
    ),
    Panel("value_loss", "Value (critic) loss", (("train", "value_loss", "value"),), smooth=True),
    Panel("clip_frac", "Clipped fraction", (("train", "clip_frac", "clip_frac"),), smooth=True),
    Panel(
        "logprob_mismatch",
        "Log-prob mismatch, generation vs training",
        (("train", "logprob_mismatch", "mismatch"),),
    ),
    Panel(
        "time_split",
        "Time per PPO iteration (s)",
        (
            ("train", "time_generation", "generation"),
            ("train", "time_scoring", "scoring"),
            ("train", "time_training", "training"),
        ),
        stacked=True,
    ),
    Panel("lr", "Learning rate", (("train", "lr", "lr"),)),
    Panel("grad_norm", "Gradient norm", (("train", "grad_norm", "grad_norm"),), smooth=True),
    Panel("tokens", "Tokens per step", (("train", "tokens", "tokens"),)),
)
TIME_SPLIT = next(p for p in PANELS if p.key == "time_split")


def panel_series(run: Run, panel: Panel) -> list[Series]:
    """The panel's curves that have at least one point in this run; a metric ending in '*' stands for every
    metric of that phase with the prefix (each gold signal, named by its metric)."""
    out = []
    for phase, metric, label in panel.lines:
        names = [metric]
        if metric.endswith("*"):
            names = sorted(
                {k for r in run.records if r.get("phase") == phase for k in r if k.startswith(metric[:-1])}
            )
        for name in names:
            xs, ys = run.series(phase, name)
            if xs:
                out.append(Series(label or series_label(name), xs, ys))
    return out


def series_label(metric: str) -> str:
    """A wildcard curve's legend label: 'gold:pkg.module:check_sampled' -> 'gold check (sampled)', so a
    module path does not push the legend out of the panel."""
    head, _, rest = metric.partition(":")
    if not rest:
        return metric
    name = rest.rsplit(":", 1)[-1]
    for kind in ("greedy", "sampled"):
        if name.endswith(f"_{kind}"):
            return f"{head} {name[: -len(kind) - 1]} ({kind})"
    return f"{head} {name}"


def is_constant(series: list[Series]) -> bool:
    """Every curve holds one value (a fixed KL coefficient, a constant lr): a number, not a plot."""
    return all(len(set(s.ys)) <= 1 for s in series)


def render_panels(run: Run) -> list[tuple[str, str]]:
    """(panel key, svg) for every panel this run has data for, in PANELS order; constant panels are left
    out (their value is in the run's summary table)."""
    out = []
    for panel in PANELS:
        series = panel_series(run, panel)
        if series and not panel.stacked and is_constant(series) and sum(len(s.ys) for s in series) > 1:
            continue
        if panel.stacked:
            svg = stacked_bar_chart(panel.title, series)
        else:
            svg = line_chart(panel.title, series, log_y=panel.log_y, smooth=panel.smooth)
        if svg:
            out.append((panel.key, svg))
    return out


def time_totals(run: Run) -> dict[str, float]:
    """Total seconds per PPO phase (generation, scoring, training) over all iterations logged."""
    return {s.label: sum(s.ys) for s in panel_series(run, TIME_SPLIT)}
