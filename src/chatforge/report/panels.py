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
            ("train", "reward_raw", "raw"),
            ("train", "reward_norm", "normalized"),
            ("eval", "reward_raw", "eval raw"),
        ),
        smooth=True,
    ),
    Panel("task_accuracy", "Task accuracy (eval)", (("eval", "task_accuracy", "eval"),)),
    Panel("kl", "KL to the reference policy", (("train", "kl", "kl"),), smooth=True),
    Panel("kl_coef", "KL coefficient", (("train", "kl_coef", "kl_coef"),)),
    Panel(
        "response_length", "Response length (tokens)", (("train", "response_length", "mean"),), smooth=True
    ),
    Panel("entropy", "Policy entropy", (("train", "entropy", "entropy"),), smooth=True),
    Panel(
        "ppo_losses",
        "PPO losses",
        (("train", "policy_loss", "policy"), ("train", "value_loss", "value"), ("train", "ptx_loss", "ptx")),
        smooth=True,
    ),
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
    """The panel's curves that have at least one point in this run."""
    out = []
    for phase, metric, label in panel.lines:
        xs, ys = run.series(phase, metric)
        if xs:
            out.append(Series(label, xs, ys))
    return out


def render_panels(run: Run) -> list[tuple[str, str]]:
    """(panel key, svg) for every panel this run has data for, in PANELS order."""
    out = []
    for panel in PANELS:
        series = panel_series(run, panel)
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
