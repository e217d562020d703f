"""The report page: one self-contained HTML file (inline SVG and CSS, no scripts, no network).

Everything read from files (names, metric keys, config, summary values) goes through `escape`."""

from __future__ import annotations

import json
import time
from html import escape
from pathlib import Path

from chatforge.report.alerts import render_banner
from chatforge.report.data import Run, find_runs, read_summary, read_text, versions
from chatforge.report.panels import render_panels, time_totals
from chatforge.report.samples import render_samples

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } .sub { color: #666; margin-top: 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.grid svg { max-width: 100%; height: auto; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 3px 10px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f6f6; }
pre { background: #f6f8fa; padding: 10px; overflow-x: auto; font-size: 12px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #0b5cad; }
.empty { color: #888; font-style: italic; }
.note { color: #555; font-size: 14px; }
.banner { background: #fff4e5; border: 1px solid #f0a000; border-left: 6px solid #e07000; padding: 8px 16px;
  margin: 16px 0; } .banner ul { margin: 6px 0; padding-left: 20px; } .banner li { margin: 4px 0; } .banner p { margin: 6px 0; }
table.samples { table-layout: fixed; width: 100%; font-size: 13px; }
table.samples th:first-child { width: 28%; } table.samples td { vertical-align: top; }
table.samples .text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; }
table.samples .scores { color: #555; margin-top: 4px; font-size: 12px; }
.up { color: #1a7f37; } .down { color: #c62828; }
"""


class NoRunsError(ValueError):
    """The report's dir holds no run: nothing to report."""


def build_report(directory: str | Path, output: str | Path | None = None) -> Path:
    """Write an HTML report of a pipeline dir (DIR/runs/<step>/) or a single run dir; return its path.

    The default output is DIR/report.html. It is written to a temporary name and renamed, so a
    reader never sees half a page. A dir with no run is an error (NoRunsError), not an empty page."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    runs = find_runs(root)
    if not runs:
        raise NoRunsError(
            f"no runs in {root}: expected {root}/runs/<step>/metrics.jsonl (a pipeline dir) or "
            f"{root}/metrics.jsonl (a run dir). Fix: give the output dir of chatforge train or of one step"
        )
    out = Path(output) if output else root / "report.html"
    html = render_page(root, runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    return out


def render_page(root: Path, runs: list[Run]) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    body = [
        "<h1>chatforge training report</h1>",
        f'<p class="sub">{escape(str(root.resolve()))} &middot; generated {generated}</p>',
        render_banner(runs),
        _overview(runs),
        _summary_section(read_summary(root)),
        *(_run_section(run) for run in runs),
        _pipeline_config(root, runs),
        "<h2>Versions</h2>",
        _table(["package", "version"], [[k, v] for k, v in versions().items()]),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>chatforge report: {escape(root.resolve().name)}</title>\n<style>{CSS}</style>\n</head>\n"
        "<body>\n" + "\n".join(part for part in body if part) + "\n</body>\n</html>\n"
    )


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """An HTML table; cells from column `numeric_from` on are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = [f"<table>\n<tr>{head}</tr>"]
    for row in rows:
        cells = "".join(
            f'<td class="num">{escape(c)}</td>' if i >= numeric_from else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join(lines + ["</table>"])


def format_seconds(seconds: float) -> str:
    """12.3s, 4m 05s, 2h 03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_value(value: float) -> str:
    return f"{value:.6g}"


def _overview(runs: list[Run]) -> str:
    total = sum(run.wall_time() for run in runs) or 1.0
    rows = []
    for run in runs:
        steps = [
            r["step"] for r in run.records if r.get("phase") == "train" and isinstance(r.get("step"), int)
        ]
        wall = run.wall_time()
        rows.append(
            [
                run.name,
                str(len(run.records)),
                str(max(steps, default=0)),
                format_seconds(wall),
                f"{wall / total:.0%}",
            ]
        )
    header = ["step", "records", "last train step", "wall time", "share"]
    return "<h2>Overview</h2>\n" + _table(header, rows)


def _summary_section(summary: dict | None) -> str:
    if summary is None:
        return ""
    rows = [[key, value] for key, value in _flatten(summary)]
    return "<h2>Summary</h2>\n" + _table(["key", "value"], rows, numeric_from=2)


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts become dotted keys; other values are shown as compact JSON (strings as is)."""
    out = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(_flatten(value, name + "."))
        elif isinstance(value, float):
            out.append((name, format_value(value)))
        else:
            out.append((name, value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
    return out


def _run_section(run: Run) -> str:
    charts = render_panels(run)
    parts = [f'<section id="run-{escape(run.name)}">', f"<h2>{escape(run.name)}</h2>"]
    if charts:
        figures = (f'<div class="panel" data-panel="{key}">\n{svg}\n</div>' for key, svg in charts)
        parts.append('<div class="grid">\n' + "\n".join(figures) + "\n</div>")
    else:
        parts.append('<p class="empty">No metrics logged yet.</p>')
    parts += [
        _time_split_table(run),
        render_samples(run),
        _last_values(run),
        _config_block("config.yaml", run.config_text),
    ]
    return "\n".join(p for p in parts if p) + "\n</section>"


def _time_split_table(run: Run) -> str:
    totals = time_totals(run)
    whole = sum(totals.values())
    if whole <= 0:
        return ""
    rows = [[phase, format_seconds(sec), f"{sec / whole:.0%}"] for phase, sec in totals.items()]
    rows.append(["total", format_seconds(whole), "100%"])
    return "<h3>PPO time split</h3>\n" + _table(["phase", "time", "share"], rows)


def _last_values(run: Run) -> str:
    last = run.last_values()
    if not last:
        return ""
    phases = list(last)
    metrics = list(dict.fromkeys(m for values in last.values() for m in values))
    rows = [[m] + [format_value(last[p][m]) if m in last[p] else "" for p in phases] for m in metrics]
    table = _table(["metric"] + [f"last {p}" for p in phases], rows)
    return f"<details>\n<summary>Last logged values</summary>\n{table}\n</details>"


def _config_block(title: str, text: str | None) -> str:
    if text is None:
        return ""
    return f"<details>\n<summary>{escape(title)}</summary>\n<pre>{escape(text)}</pre>\n</details>"


def _pipeline_config(root: Path, runs: list[Run]) -> str:
    """DIR/config.yaml of a pipeline dir (a single run dir's config is already in its section)."""
    if any(run.root == root for run in runs):
        return ""
    block = _config_block("config.yaml", read_text(root / "config.yaml"))
    return f"<h2>Pipeline config</h2>\n{block}" if block else ""
