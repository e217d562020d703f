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
from chatforge.report.page import NoRunsError

from .conftest import (
    PPO_PANELS,
    REWARD_PANELS,
    SFT_PANELS,
    ppo_records,
    ppo_samples,
    sft_records,
    write_run,
    write_samples,
)


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
    assert "gold is_correct (sampled)" in gold and "proxy reward" in gold


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


def test_dir_without_runs_is_an_error_not_an_empty_page(tmp_path):
    (tmp_path / "runs" / "notes").mkdir(parents=True)  # a dir without metrics.jsonl or config.yaml
    with pytest.raises(NoRunsError, match=r"no runs in .*runs/<step>/metrics.jsonl.*Fix: "):
        build_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


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
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chatforge report: no runs in {empty}") and err.count("\n") == 1


def test_cli_entry_point_without_heavy_imports(pipeline_dir):
    """The installed `chatforge report` works, and the report never pulls torch in."""
    exe = Path(sys.executable).parent / "chatforge"
    done = subprocess.run([str(exe), "report", str(pipeline_dir)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == pipeline_dir / "report.html"
    empty = pipeline_dir / "runs" / "sft" / "checkpoints"
    empty.mkdir()
    done = subprocess.run([str(exe), "report", str(empty)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done
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


# --- samples and warnings ---------------------------------------------------------------------------
def sample_tables(section: str) -> list[tuple[str, str, list[list[str]]]]:
    """(details attributes, summary, rows of cell texts) of each sample table, in page order; a cell's text
    is its parts (response, scores) joined by ' | ', tags removed."""
    out = []
    tables = re.findall(
        r'<details( open)?>\n<summary>([^<]*)</summary>\n<table class="samples">(.*?)</table>', section, re.S
    )
    for attrs, summary, table in tables:
        rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
        cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S) for row in rows]
        text = [[re.sub(r"<[^>]+>", "", c.replace("</div><div", "</div> | <div")) for c in r] for r in cells]
        out.append((attrs, summary, text))
    return out


def test_sample_tables_put_each_evaluation_next_to_the_sft_model(pipeline_dir):
    secs = sections(build_report(pipeline_dir).read_text())
    assert "Sample responses" not in secs["sft"] + secs["reward"]
    tables = sample_tables(secs["ppo"])
    assert [(a, s) for a, s, _ in tables] == [
        (" open", "step 12 vs SFT (step 0)"),  # the newest evaluation first, open
        ("", "step 6 vs SFT (step 0)"),
    ]
    head, *rows = tables[0][2]
    assert head == ["prompt", "SFT model (step 0)", "policy at step 12"]
    assert rows == [
        [
            "What is 3 + 4?",
            "7 | reward 0.2 &middot; task:is_correct 1",
            "7 7 7 7 7 7 7 7 7 7 7 7 | reward 1.9 (+1.7) &middot; task:is_correct 0 (-1)",
        ],
        [
            "What is 2 * 2?",
            "5 | reward -0.1 &middot; task:is_correct 0",
            "4, and &lt;b&gt;bold&lt;/b&gt; claims | reward 1.2 (+1.3) &middot; task:is_correct 1 (+1)",
        ],
        [  # the repeated prompt pairs with the second SFT response to it
            "What is 3 + 4?",
            "8 | reward 0 &middot; task:is_correct 0",
            "7 | reward 0.9 (+0.9) &middot; task:is_correct 1 (+1)",
        ],
    ]
    assert '<span class="down">(-1)</span>' in secs["ppo"] and "<b>bold" not in secs["ppo"]


def test_samples_of_a_resumed_evaluation_replace_the_first_and_step_0_alone_gets_its_own_table(tmp_path):
    first = [r for r in ppo_samples() if r["step"] < 12]
    redone = [{**r, "response": f"redone {r['response']}"} for r in first if r["step"] == 6]
    run = load_run(write_run(tmp_path / "ppo", ppo_records()))
    write_samples(run.root, first + redone)
    run = load_run(run.root)
    assert sorted(run.samples) == [0, 6] and [r["response"] for r in run.samples[6]] == [
        "redone 7",
        "redone 4",
        "redone 7",
    ]

    only_sft = write_run(tmp_path / "ppo0", ppo_records())
    write_samples(only_sft, [r for r in ppo_samples() if r["step"] == 0])
    ((attrs, summary, (head, *rows)),) = sample_tables(sections(build_report(only_sft).read_text())["ppo0"])
    assert (attrs, summary, head, len(rows)) == (
        " open",
        "step 0 (SFT model)",
        ["prompt", "SFT model (step 0)"],
        3,
    )
    assert rows[1] == ["What is 2 * 2?", "5 | reward -0.1 &middot; task:is_correct 0"]


def banner(html: str) -> str:
    match = re.search(r'<div class="banner" role="alert">(.*?)</div>', html, re.S)
    return match.group(1) if match else ""


def test_banner_says_which_evaluation_warned_and_what_moved(pipeline_dir):
    html = build_report(pipeline_dir).read_text()
    assert html.index('class="banner"') < html.index("<h2>Overview</h2>")  # at the top
    items = re.findall(r"<li>(.*?)</li>", banner(html), re.S)
    assert len(items) == 1  # step 6 logged warnings = 0, step 12 one warning
    text = items[0]
    assert text.startswith(
        '<a href="#run-ppo">ppo</a>: possible reward hacking at evaluation step 12 (1 warning)'
    )
    assert "the proxy reward rose from 0 to 1.5" in text
    assert "gold:task:is_correct fell from 0.5 to 0.4" in text
    # the collapse check judges greedy replies: 1 - identical_share_greedy, 100% -> 88%
    assert "the share of prompts with a greedy reply of their own fell from 100% to 88%" in text
    assert "distinct-2 of the greedy replies" not in text  # not logged here
    assert "the SFT model finds the median sampled response 0.2 nats less likely than its own" in text
    assert "the KL to the reference is 1.2 nats per response" in text
    assert "read its sample responses" in banner(html)  # what to do about it, said once


def test_banner_says_when_an_earlier_evaluation_was_exported(tmp_path):
    records = ppo_records() + [{"phase": "guard", "step": 12, "time": 130.0, "exported_step": 6.0}]
    items = re.findall(
        r"<li>(.*?)</li>", banner(build_report(write_run(tmp_path / "ppo", records)).read_text())
    )
    assert len(items) == 2  # the warning of step 12, then the export
    assert items[1].startswith(
        '<a href="#run-ppo">ppo</a>: the exported model is the one of evaluation step 6, not the last '
        "iteration&#x27;s (12, kept in actor-last)"
    )


def test_no_banner_without_warnings(tmp_path):
    quiet = [r for r in ppo_records() if not r.get("warnings")]
    assert 'class="banner"' not in build_report(write_run(tmp_path / "ppo", quiet)).read_text()


def test_banner_reports_a_kl_limit_stop_and_the_step_restored(tmp_path):
    records = [r for r in ppo_records() if r["phase"] == "train" and r["step"] <= 7 or r["step"] == 0]
    records += [
        {"phase": "guard", "step": 7, "time": 70.0, "kl_limit_stop": 1.0, "kl": 3.2},
        {"phase": "eval", "step": 6, "time": 75.0, "reward_sampled": 0.5, "kl_sampled": 1.1},
    ]
    root = write_run(tmp_path / "ppo", records, config="algorithm:\n  kl_limit: 2.0\n  kl_target: 1.0\n")
    items = re.findall(r"<li>(.*?)</li>", banner(build_report(root).read_text()), re.S)
    assert items == [
        '<a href="#run-ppo">ppo</a>: the KL to the reference reached 3.2 nats per response at iteration 7, '
        "past algorithm.kl_limit=2. The run stopped early and went back to its last checkpoint within the KL "
        "budget (step 6): beyond that point the reward model&#x27;s scores were no longer trusted."
    ]
    assert "read its sample responses" not in banner(build_report(root).read_text())  # no hacking warning


def test_an_empty_response_is_shown_as_such(tmp_path):
    root = write_run(tmp_path / "ppo", ppo_records())
    write_samples(root, [{**r, "response": "" if r["step"] else r["response"]} for r in ppo_samples()])
    (_, _, (_, first, *_)), *_ = sample_tables(sections(build_report(root).read_text())["ppo"])
    assert first[2].startswith("(empty response) | reward 1.9")


def test_wildcard_curves_get_short_legend_labels():
    from chatforge.report.panels import series_label

    assert series_label("gold:chatforge.fixtures.task:is_correct_greedy") == "gold is_correct (greedy)"
    assert series_label("gold:runs/rm2_sampled") == "gold runs/rm2 (sampled)"
    assert series_label("reward_sampled") == "reward_sampled"
