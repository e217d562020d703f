"""A small inline-SVG plotter: line charts (linear or log y, EMA overlay, legend) and stacked bars.

Pure Python so `chatforge report` stays light. Output depends only on the inputs (fixed layout,
fixed palette, rounded coordinates), so the same metrics always give byte-identical SVG."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_POINTS = 800  # per series; longer ones are thinned keeping each bucket's min and max (spikes stay)
MARKER_LIMIT = 40  # series this short get a dot per point (eval curves have few points)


@dataclass(frozen=True)
class Series:
    """One curve: points sorted by x, all finite."""

    label: str
    xs: list[float]
    ys: list[float]


@dataclass(frozen=True)
class Layout:
    """Chart size in px; the plot area is what is left inside the margins."""

    width: int = 560
    height: int = 300
    left: int = 64
    right: int = 16
    top: int = 44  # room for the title and the legend row
    bottom: int = 40

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom


@dataclass(frozen=True)
class Axis:
    """A value range with its tick positions; `log` maps values through log10 first."""

    lo: float
    hi: float
    ticks: list[float]
    log: bool = False

    def frac(self, value: float) -> float:
        """Where `value` sits on the axis, 0 at `lo` and 1 at `hi`."""
        if self.log:
            return (math.log10(value) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return (value - self.lo) / (self.hi - self.lo)


def nice_step(span: float, max_ticks: int = 6) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k step that cuts `span` into at most `max_ticks` intervals."""
    raw = span / max(1, max_ticks)
    magnitude = 10 ** math.floor(math.log10(raw))
    for mult in (1, 2, 2.5, 5, 10):
        if mult * magnitude >= raw * (1 - 1e-9):
            return mult * magnitude
    return 10 * magnitude


def linear_axis(lo: float, hi: float, max_ticks: int = 6) -> Axis:
    """An axis widened outwards to round tick values that cover [lo, hi]."""
    if hi - lo < 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = abs(lo) * 0.1 or 1.0  # a flat series still gets a readable range around it
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, max_ticks)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [_clean(i * step) for i in range(first, last + 1)]
    return Axis(ticks[0], ticks[-1], ticks)


def log_axis(lo: float, hi: float) -> Axis:
    """A log10 axis over whole decades; within a single decade the 2x and 5x marks are added."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if last == first:
        last += 1
    ticks = [10.0**k for k in range(first, last + 1)]
    if last - first == 1:
        ticks = sorted(ticks + [2 * 10.0**first, 5 * 10.0**first])
    return Axis(ticks[0], ticks[-1], ticks, log=True)


def _clean(value: float) -> float:
    # i * step can give 0.30000000000000004; round to the step's precision so labels stay short.
    return round(value, 12) + 0.0


def tick_labels(ticks: list[float]) -> list[str]:
    """Short labels: 0.25, 1.5, 12.5k, 2M; scientific (1.5e-5) when the whole axis is below 0.01."""
    tiny = max(abs(t) for t in ticks) < 1e-2
    return [_tick_label(t, tiny) for t in ticks]


def _tick_label(value: float, tiny: bool) -> str:
    if value == 0:
        return "0"
    if tiny:
        mantissa, exponent = _shortest(value, "e").split("e")
        return f"{mantissa}e{int(exponent)}"
    if abs(value) >= 1e6:
        return _shortest(value / 1e6, "f") + "M"
    if abs(value) >= 1e4:
        return _shortest(value / 1e3, "f") + "k"
    return _shortest(value, "f")


def _shortest(value: float, kind: str) -> str:
    """Fewest digits after the point that still show `value` (ticks are round, so few are needed)."""
    for digits in range(7):
        text = f"{value:.{digits}{kind}}"
        if abs(float(text) - value) <= 1e-9 * abs(value):
            return text
    return f"{value:.6{kind}}"


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard-style smoothing: exponential moving average, debiased so it starts at the data."""
    out, acc = [], 0.0
    for i, value in enumerate(values, start=1):
        acc = acc * weight + (1 - weight) * value
        out.append(acc / (1 - weight**i))
    return out


def smoothing_weight(n_points: int) -> float:
    """EMA weight that averages over ~1/40 of the curve (at least 5 points): a fixed weight is
    too rough for 10k SFT steps and too flat for 100 PPO iterations."""
    span = max(5.0, n_points / 40)
    return 1 - 2 / (span + 1)


def thin(xs: list[float], ys: list[float], max_points: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """At most ~max_points points: each bucket keeps its min and max, so spikes survive thinning."""
    if len(xs) <= max_points:
        return xs, ys
    size = math.ceil(len(xs) / (max_points // 2))
    keep = {0, len(xs) - 1}  # the curve still spans the whole run
    for start in range(0, len(xs), size):
        idx = range(start, min(start + size, len(xs)))
        keep.update((min(idx, key=ys.__getitem__), max(idx, key=ys.__getitem__)))
    return [xs[i] for i in sorted(keep)], [ys[i] for i in sorted(keep)]


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _px(axis_x: Axis, axis_y: Axis, layout: Layout, x: float, y: float) -> tuple[float, float]:
    return (
        layout.left + axis_x.frac(x) * layout.plot_w,
        layout.top + (1 - axis_y.frac(y)) * layout.plot_h,
    )


def _open_svg(title: str, layout: Layout) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {layout.width} {layout.height}" '
        f'width="{layout.width}" height="{layout.height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{layout.width}" height="{layout.height}" fill="#fff"/>',
        f'<text x="8" y="17" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]


def _legend(labels: list[str], layout: Layout) -> list[str]:
    out, x, y = [], float(layout.left), layout.top - 12
    for i, label in enumerate(labels):
        color = PALETTE[i % len(PALETTE)]
        out.append(
            f'<line x1="{_num(x)}" y1="{y - 4}" x2="{_num(x + 16)}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>'
        )
        out.append(f'<text x="{_num(x + 20)}" y="{y}">{escape(label)}</text>')
        x += 32 + 6.2 * len(label)  # rough text width; the legend only has to not overlap
    return out


def _y_grid(axis: Axis, layout: Layout) -> list[str]:
    out = []
    for tick, label in zip(axis.ticks, tick_labels(axis.ticks)):
        y = layout.top + (1 - axis.frac(tick)) * layout.plot_h
        x0, x1 = layout.left, layout.left + layout.plot_w
        out.append(f'<line x1="{x0}" y1="{_num(y)}" x2="{x1}" y2="{_num(y)}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x0 - 6}" y="{_num(y + 4)}" text-anchor="end">{label}</text>')
    return out


def _x_ticks(axis: Axis, layout: Layout, x_label: str) -> list[str]:
    base = layout.top + layout.plot_h
    out = []
    for tick, label in zip(axis.ticks, tick_labels(axis.ticks)):
        x = layout.left + axis.frac(tick) * layout.plot_w
        out.append(f'<line x1="{_num(x)}" y1="{base}" x2="{_num(x)}" y2="{base + 4}" stroke="#555"/>')
        out.append(f'<text x="{_num(x)}" y="{base + 16}" text-anchor="middle">{label}</text>')
    return out + [_x_label(x_label, layout)]


def _x_label(text: str, layout: Layout) -> str:
    mid = layout.left + layout.plot_w / 2
    return f'<text x="{_num(mid)}" y="{layout.height - 6}" text-anchor="middle" fill="#555">{escape(text)}</text>'


def _frame(layout: Layout) -> str:
    return (
        f'<rect x="{layout.left}" y="{layout.top}" width="{layout.plot_w}" height="{layout.plot_h}" '
        'fill="none" stroke="#555"/>'
    )


def _curve(
    xs: list[float], ys: list[float], color: str, ax: Axis, ay: Axis, layout: Layout, faint: bool
) -> list[str]:
    xs, ys = thin(xs, ys)
    pts = [_px(ax, ay, layout, x, y) for x, y in zip(xs, ys)]
    style = ' stroke-opacity="0.3"' if faint else ""
    out = []
    if len(pts) > 1:
        joined = " ".join(f"{_num(px)},{_num(py)}" for px, py in pts)
        out.append(f'<polyline points="{joined}" fill="none" stroke="{color}" stroke-width="1.5"{style}/>')
    if len(pts) <= MARKER_LIMIT and not faint:
        out.extend(f'<circle cx="{_num(px)}" cy="{_num(py)}" r="2.5" fill="{color}"/>' for px, py in pts)
    return out


def line_chart(
    title: str,
    series: list[Series],
    *,
    x_label: str = "step",
    log_y: bool = False,
    smooth: bool = False,
    layout: Layout = Layout(),
) -> str:
    """An SVG line chart, or "" when no series has a point to draw.

    smooth draws each long series faintly with its EMA on top, for noisy train curves (short ones,
    like eval curves, are drawn as they are); log_y drops values <= 0, which a log axis cannot show."""
    if log_y:
        series = [_positive(s) for s in series]
    series = [s for s in series if s.xs]
    if not series:
        return ""
    all_x = [x for s in series for x in s.xs]
    all_y = [y for s in series for y in s.ys]
    ax = linear_axis(min(all_x), max(all_x), max_ticks=7)
    ay = log_axis(min(all_y), max(all_y)) if log_y else linear_axis(min(all_y), max(all_y))
    parts = _open_svg(title, layout) + _legend([s.label for s in series], layout)
    parts += _y_grid(ay, layout) + _x_ticks(ax, layout, x_label) + [_frame(layout)]
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        smoothed = smooth and len(s.xs) > MARKER_LIMIT
        parts += _curve(s.xs, s.ys, color, ax, ay, layout, faint=smoothed)
        if smoothed:
            parts += _curve(s.xs, ema(s.ys, smoothing_weight(len(s.ys))), color, ax, ay, layout, faint=False)
    return "\n".join(parts + ["</svg>"])


def _positive(s: Series) -> Series:
    kept = [(x, y) for x, y in zip(s.xs, s.ys) if y > 0]
    return Series(s.label, [x for x, _ in kept], [y for _, y in kept])


MAX_BARS = 60  # more iterations than this are averaged into this many bars


def stacked_bar_chart(
    title: str, parts: list[Series], *, x_label: str = "step", layout: Layout = Layout()
) -> str:
    """Stacked bars, one per x (or per bin of consecutive x), a segment per series; "" when empty.

    A series missing at some x counts as 0 there. Meant for a time split, where the bar height is
    the total time of the iteration."""
    parts = [p for p in parts if p.xs]
    if not parts:
        return ""
    bins, heights = _bin_means(parts)
    ay = linear_axis(0.0, max(sum(h) for h in heights) or 1.0)
    out = _open_svg(title, layout) + _legend([p.label for p in parts], layout) + _y_grid(ay, layout)
    slot = layout.plot_w / len(bins)
    for i, stack in enumerate(heights):
        x, y = layout.left + i * slot + slot * 0.1, float(layout.top + layout.plot_h)
        for j, value in enumerate(stack):
            dy = ay.frac(value) * layout.plot_h
            y -= dy
            out.append(
                f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(slot * 0.8)}" height="{_num(dy)}" '
                f'fill="{PALETTE[j % len(PALETTE)]}"/>'
            )
    out += _bar_labels([b[0] for b in bins], slot, layout, x_label)
    return "\n".join(out + [_frame(layout), "</svg>"])


def _bin_means(parts: list[Series]) -> tuple[list[list[float]], list[list[float]]]:
    """Consecutive x values cut into at most MAX_BARS bins; per bin, each series' mean (absent or
    negative counts as 0, a segment has no negative height)."""
    steps = sorted({x for p in parts for x in p.xs})
    size = math.ceil(len(steps) / MAX_BARS)
    bins = [steps[i : i + size] for i in range(0, len(steps), size)]
    by_x = [dict(zip(p.xs, p.ys)) for p in parts]
    heights = [[max(0.0, sum(m.get(x, 0.0) for x in b) / len(b)) for m in by_x] for b in bins]
    return bins, heights


def _bar_labels(first_steps: list[float], slot: float, layout: Layout, x_label: str) -> list[str]:
    every = math.ceil(len(first_steps) / 8)  # at most ~8 labels, so they never collide
    base = layout.top + layout.plot_h
    out = []
    for i in range(0, len(first_steps), every):
        x = layout.left + (i + 0.5) * slot
        out.append(
            f'<text x="{_num(x)}" y="{base + 16}" text-anchor="middle">{_tick_label(first_steps[i], False)}</text>'
        )
    return out + [_x_label(x_label, layout)]
