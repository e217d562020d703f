from __future__ import annotations

from chatforge.cli import main
from chatforge.fixtures import task_rows

from .conftest import write_rows


def test_data_inspect_prints_format_splits_stats_and_examples(tmp_path, fixture_dir, capsys):
    path = write_rows(tmp_path / "task.jsonl", task_rows(40))
    code = main(
        ["data", "inspect", path, "--tokenizer", str(fixture_dir / "tokenizer"), "--eval-fraction", "0.25"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "format: dschat   rows: 40" in out
    assert "sft     train       6  eval      2" in out and "reward  train      12  eval      4" in out
    assert "== step sft" in out and "input_ids lengths:" in out and "<|assistant|>[[The answer is" in out
    assert "chosen: 'The answer is" in out and "== step ppo" in out


def test_data_inspect_reports_bad_data_without_traceback(tmp_path, capsys):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"prompt": 1}\n')
    assert main(["data", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl" in err and "Traceback" not in err
