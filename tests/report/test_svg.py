"""The SVG plotter: round ticks, data-to-pixel mapping, log scale, smoothing, thinning, escaping."""

from __future__ import annotations

import re

import pytest

from chatforge.report.svg import (
    Layout,
    Series,
    ema,
    line_chart,
    linear_axis,
    log_axis,
    stacked_bar_chart,
    thin,
    tick_labels,
)

# Default layout: plot area x in [64, 544] (480 px), y in [44, 260] (216 px).
L = Layout()


def polylines(svg: str) -> list[list[tuple[float, float]]]:
    out = []
    for pts in re.findall(r'<polyline points="([^"]+)"', svg):
        out.append([tuple(float(v) for v in p.split(",")) for p in pts.split()])
    return out


def test_layout_plot_area():
    assert (L.plot_w, L.plot_h) == (480, 216)


@pytest.mark.parametrize(
    ("lo", "hi", "ticks"),
    [
        (0.13, 0.87, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (1, 60, [0, 10, 20, 30, 40, 50, 60]),
        (-0.37, 0.12, [-0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2]),
        (0, 2.3e-4, [0, 5e-5, 1e-4, 1.5e-4, 2e-4, 2.5e-4]),
    ],
)
def test_linear_axis_has_round_ticks_covering_the_data(lo, hi, ticks):
    axis = linear_axis(lo, hi)
    assert axis.ticks == pytest.approx(ticks)
    assert axis.lo <= lo and axis.hi >= hi


def test_flat_series_gets_a_nonempty_range():
    axis = linear_axis(5.0, 5.0)
    assert axis.lo < 5.0 < axis.hi


def test_log_axis_uses_decades_and_marks_inside_one_decade():
    assert log_axis(3, 700).ticks == [1, 10, 100, 1000]
    assert log_axis(2, 8).ticks == [1, 2, 5, 10]


@pytest.mark.parametrize(
    ("ticks", "labels"),
    [
        ([0, 0.25, 0.5, 0.75, 1.0], ["0", "0.25", "0.5", "0.75", "1"]),
        ([0, 5e-6, 1e-5, 1.5e-5], ["0", "5e-6", "1e-5", "1.5e-5"]),
        ([0, 5e-4, 1e-3, 1.5e-3], ["0", "5e-4", "1e-3", "1.5e-3"]),
        ([0, 12_500, 25_000], ["0", "12.5k", "25k"]),
        ([1, 10, 100, 1000], ["1", "10", "100", "1000"]),
        ([-2e6, 0, 2e6], ["-2M", "0", "2M"]),
    ],
)
def test_tick_labels_are_short_and_distinct(ticks, labels):
    assert tick_labels(ticks) == labels


def test_points_map_data_to_pixels():
    # x axis 0..10, y axis 0..1: (0,0) bottom-left, (5,.5) centre, (10,1) top-right of the plot area.
    svg = line_chart("t", [Series("s", [0, 5, 10], [0, 0.5, 1])])
    assert polylines(svg) == [[(64, 260), (304, 152), (544, 44)]]
    assert svg.count("<circle") == 3  # short series get markers


def test_log_scale_maps_decades_evenly_and_drops_nonpositive():
    svg = line_chart("ppl", [Series("s", [0, 1, 2, 3], [1, 10, 100, -5])], log_y=True)
    (line,) = polylines(svg)
    assert [y for _, y in line] == [260, 152, 44]  # -5 has no place on a log axis


def test_empty_or_unplottable_series_give_no_chart():
    assert line_chart("t", []) == ""
    assert line_chart("t", [Series("s", [], [])]) == ""
    assert line_chart("t", [Series("s", [1], [0.0])], log_y=True) == ""
    assert stacked_bar_chart("t", [Series("s", [], [])]) == ""


def test_single_point_is_drawn_as_a_marker():
    svg = line_chart("t", [Series("s", [3], [2.0])])
    assert polylines(svg) == [] and svg.count("<circle") == 1


def test_ema_is_debiased_and_exact_on_constants():
    assert ema([1.0, 1.0, 1.0], 0.8) == pytest.approx([1.0, 1.0, 1.0])
    # acc: 0 -> 5; debiased by 1 - 0.5**2 = 0.75
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 / 1.5])


def test_smoothing_draws_faint_raw_and_solid_ema():
    xs = list(range(100))
    ys = [float(i % 2) for i in xs]
    svg = line_chart("t", [Series("loss", xs, ys)], smooth=True)
    raw, smooth = polylines(svg)
    assert svg.count('stroke-opacity="0.3"') == 1
    spread = lambda line: max(y for _, y in line[50:]) - min(y for _, y in line[50:])  # noqa: E731
    assert spread(smooth) < 0.3 * spread(raw)


def test_thin_keeps_spikes_and_bounds_points():
    xs = list(range(10_000))
    ys = [0.0] * 10_000
    ys[5003] = 9.0
    tx, ty = thin(xs, ys, max_points=200)
    assert len(tx) <= 202 and 9.0 in ty and tx == sorted(tx)
    assert (tx[0], tx[-1]) == (0, 9_999)
    assert thin(xs[:50], ys[:50], max_points=200) == (xs[:50], ys[:50])


def test_labels_and_titles_are_escaped():
    svg = line_chart("a<b & c", [Series('<script>"x"', [0, 1], [0, 1])], x_label="<i>")
    assert "<script>" not in svg and "&lt;script&gt;&quot;x&quot;" in svg
    assert "a&lt;b &amp; c" in svg and "&lt;i&gt;" in svg


def test_stacked_bars_stack_segments_to_the_total():
    parts = [Series("gen", [1], [3.0]), Series("train", [1], [1.0])]
    svg = stacked_bar_chart("time", parts)  # y axis 0..4: 54 px per second
    bars = re.findall(r'<rect x="[^"]+" y="([^"]+)" width="[^"]+" height="([^"]+)" fill="#', svg)
    assert [(float(y), float(h)) for y, h in bars] == [(98, 162), (44, 54)]


def test_stacked_bars_bin_long_runs():
    parts = [Series("gen", list(range(500)), [1.0] * 500)]
    svg = stacked_bar_chart("time", parts)
    assert 1 <= len(re.findall(r"<rect x=", svg)) <= 60
