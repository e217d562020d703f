"""build_report and `chatforge report`: panels per step, torn and partial files, escaping, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.cli import main
from chatforge.report import build_report
from chatforge.report.data import load_run

from .conftest import PPO_PANELS, REWARD_PANELS, SFT_PANELS, ppo_records, sft_records, write_run


def sections(html: str) -> dict[str, str]:
    """Run name -> that run's <section> html."""
    return dict(re.findall(r'<section id="run-([^"]+)">(.*?)</section>', html, flags=re.S))


def panels(section: str) -> list[str]:
    return re.findall(r'data-panel="([^"]+)"', section)


def test_pipeline_report_has_one_svg_per_expected_panel(pipeline_dir):
    path = build_report(pipeline_dir)
    assert path == pipeline_dir / "report.html"
    html = path.read_text()
    secs = sections(html)
    assert list(secs) == ["sft", "reward", "ppo"]  # pipeline order, not alphabetical
    for name, expected in (("sft", SFT_PANELS), ("reward", REWARD_PANELS), ("ppo", PPO_PANELS)):
        assert panels(secs[name]) == expected
        assert secs[name].count("<svg") == len(expected)
    assert html.count("<svg") == len(SFT_PANELS) + len(REWARD_PANELS) + len(PPO_PANELS)


def test_missing_metrics_drop_their_curve_and_panel(pipeline_dir):
    ppo = sections(build_report(pipeline_dir).read_text())["ppo"]
    losses = ppo.split('data-panel="policy_loss"')[1].split("</svg>")[0]
    assert ">policy<" in losses and ">ptx<" not in losses  # ptx_loss never logged
    assert 'data-panel="perplexity"' not in ppo
    assert 'data-panel="kl_coef"' not in ppo  # a fixed coefficient is a number, not a plot
    gold = ppo.split('data-panel="gold"')[1].split("</svg>")[0]
    assert "gold:task:is_correct_sampled" in gold and "proxy reward" in gold


def test_torn_last_line_is_skipped(pipeline_dir):
    run = load_run(pipeline_dir / "runs" / "sft")
    assert len(run.records) == len(sft_records())
    xs, _ = run.series("train", "loss")
    assert xs[-1] == 60  # not 99999 from the torn line


def test_ppo_time_split_table_and_overview(pipeline_dir):
    html = build_report(pipeline_dir).read_text()
    ppo = sections(html)["ppo"]
    # 12 iterations of 6 + 1 + 3 s
    assert '<td>generation</td><td class="num">1m 12s</td><td class="num">60%</td>' in ppo
    assert '<td>total</td><td class="num">2m 00s</td>' in ppo
    overview = html.split("<h2>Overview</h2>")[1].split("</table>")[0]
    assert '<td>sft</td><td class="num">' in overview and '<td class="num">60</td>' in overview


def test_config_summary_and_versions_are_shown(pipeline_dir):
    html = build_report(pipeline_dir).read_text()
    assert "<summary>config.yaml</summary>\n<pre>model:\n  name: tiny-llama\n</pre>" in html
    assert "<td>accuracy_after</td><td>0.4</td>" in html and "<td>sample.prompt</td><td>2+2?</td>" in html
    versions = html.split("<h2>Versions</h2>")[1]
    for name in ("python", "torch", "transformers", "deepspeed", "peft", "datasets", "chatforge"):
        assert f"<td>{name}</td>" in versions


def test_text_from_files_is_escaped(tmp_path):
    root = tmp_path / "out"
    evil = "</pre><script>alert(1)</script>"
    records = [{"phase": "train", "step": 1, "time": 1.0, "loss": 1.0, "<img src=x>": 2.0}]
    write_run(root / "runs" / "a&b", records, config=f"name: {evil}\n")
    (root / "demo_summary.json").write_text(json.dumps({"<b>k</b>": evil}))
    html = build_report(root).read_text()
    assert "<script>" not in html and "<img" not in html and "<b>k" not in html
    assert "&lt;/pre&gt;&lt;script&gt;" in html and "&lt;img src=x&gt;" in html and "<h2>a&amp;b</h2>" in html


def test_empty_and_garbage_metrics_give_no_panel_and_no_crash(tmp_path):
    root = tmp_path / "out"
    write_run(root / "runs" / "sft", [], torn=True)  # only a torn line
    bad = root / "runs" / "reward"
    bad.mkdir(parents=True)
    rows = [
        "[1, 2]",
        "",
        '{"phase": "train", "step": "x", "loss": 1}',
        '{"phase": "train", "step": 1, "loss": NaN}',
    ]
    (bad / "metrics.jsonl").write_text("\n".join(rows + ['{"phase": "train", "step": 2, "loss": "high"}']))
    html = build_report(root).read_text()
    assert "<svg" not in html
    assert html.count("No metrics logged yet.") == 2


def test_dir_without_runs_still_gives_a_page(tmp_path):
    html = build_report(tmp_path).read_text()
    assert "No run dirs found" in html and "<h2>Versions</h2>" in html


def test_missing_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path / "nope")


def test_single_run_dir(tmp_path):
    run_dir = write_run(tmp_path / "my-sft", sft_records())
    out = build_report(run_dir, tmp_path / "elsewhere" / "r.html")
    secs = sections(out.read_text())
    assert list(secs) == ["my-sft"] and panels(secs["my-sft"]) == SFT_PANELS
    assert "Pipeline config" not in out.read_text()


def test_resumed_run_sums_time_segments_and_keeps_last_value_per_step(tmp_path):
    first = [{"phase": "train", "step": s, "time": 10.0 * s, "kl": 1.0} for s in (1, 2, 3)]
    # resumed from the step-2 checkpoint: the clock restarts and step 3 is logged again
    second = [{"phase": "train", "step": s, "time": 5.0 * (s - 2), "kl": 2.0} for s in (3, 4)]
    run = load_run(write_run(tmp_path / "ppo", first + second))
    assert run.wall_time() == 30.0 + 10.0
    assert run.series("train", "kl") == ([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0])


def test_report_is_deterministic_apart_from_the_header_time(pipeline_dir, tmp_path):
    strip = lambda p: re.sub(r"generated [^<]+", "", p.read_text())  # noqa: E731
    assert strip(build_report(pipeline_dir, tmp_path / "a.html")) == strip(
        build_report(pipeline_dir, tmp_path / "b.html")
    )


def test_cli_in_process(pipeline_dir, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(pipeline_dir), "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2  # bad input (a missing dir), not a crash
    assert "is not a directory" in capsys.readouterr().err


def test_cli_entry_point_without_heavy_imports(pipeline_dir):
    """The installed `chatforge report` works, and the report never pulls torch in."""
    exe = Path(sys.executable).parent / "chatforge"
    done = subprocess.run([str(exe), "report", str(pipeline_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == pipeline_dir / "report.html"
    code = (
        "import sys; from chatforge.report import build_report; build_report(sys.argv[1]); "
        "assert not {'torch', 'deepspeed', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(pipeline_dir)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_ppo_only_run_dir_gets_ppo_panels(tmp_path):
    secs = sections(build_report(write_run(tmp_path / "ppo-run", ppo_records())).read_text())
    assert panels(secs["ppo-run"]) == PPO_PANELS
