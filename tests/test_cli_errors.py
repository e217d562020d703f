"""The CLI's one error boundary: exit codes (2 bad input, 1 crash, 130 Ctrl-C), one line each, the hand-over
to `chatforge train` under a step, and the quiet library output. tests/test_bad_inputs.py runs the catalogue
of bad inputs through it."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from chatforge.cli import describe_error, report_error

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_no_command_exits_2_with_the_usage():
    proc = subprocess.run([sys.executable, "-m", "chatforge"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "usage: chatforge [-h] [--version] [--debug] COMMAND ...",
        "chatforge: error: give a command (chatforge --help lists them)",
    ]


@pytest.mark.parametrize("module", ["chatforge", "chatforge.cli"])
def test_python_dash_m_runs_the_cli(module):
    from chatforge import __version__

    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == f"chatforge {__version__}"


def test_describe_error_codes_and_lines():
    from chatforge.config import ConfigError
    from chatforge.data import DataError
    from chatforge.trainers.checkpoint import DiskFullError

    assert describe_error(ConfigError("batch.epochs must be >= 1, got -1\nmore")) == (
        2, "batch.epochs must be >= 1, got -1"
    )  # fmt: skip
    assert describe_error(DataError("a.jsonl, row 3: bad. Fix: x"))[0] == 2
    assert describe_error(FileNotFoundError("x is not a directory")) == (2, "x is not a directory")
    code, line = describe_error(RuntimeError("boom"), "sft")
    assert (code, line) == (1, "crashed with RuntimeError: boom (rerun with --debug for the traceback)")

    class Known(RuntimeError):
        exit_code = 1

    assert describe_error(Known("step 2 (reward) failed")) == (1, "step 2 (reward) failed")
    full = DiskFullError("no space left on runs/sft while writing checkpoint step4; the last complete checkpoint (step2, in runs/sft/checkpoints) is kept")  # fmt: skip
    assert describe_error(full, "sft") == (
        1,
        f"{full}. Fix: free space, then rerun with --resume to continue from the last checkpoint",
    )
    plain = OSError(errno.ENOSPC, "No space left on device", "runs/out/x.pt")
    assert describe_error(plain, "report") == (
        1,
        "no space left on the device of runs/out/x.pt. Fix: free space",
    )


def test_report_error_under_a_pipeline_step_writes_one_file_per_rank(tmp_path, monkeypatch, capsys):
    path = tmp_path / "ERROR"
    monkeypatch.setenv("CHATFORGE_ERROR_FILE", str(path))
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        report_error("sft", 2, "data.jsonl, row 2: bad")
    assert capsys.readouterr().err == ""  # the parent prints it, once
    assert json.loads(path.read_text()) == {"code": 2, "line": "data.jsonl, row 2: bad", "rank": 0}
    assert json.loads((tmp_path / "ERROR.rank1").read_text())["rank"] == 1
    monkeypatch.delenv("CHATFORGE_ERROR_FILE")
    report_error("sft", 2, "data.jsonl, row 2: bad")
    assert capsys.readouterr().err == "chatforge sft: data.jsonl, row 2: bad\n"


def test_deepspeed_cpu_notice_is_dropped_and_other_warnings_kept(monkeypatch):
    from chatforge.cli.quiet import quiet_libraries

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen: list[str] = []
    monkeypatch.delenv("CHATFORGE_VERBOSE", raising=False)
    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)  # restored after the test
    quiet_libraries()
    logger, handler = logging.getLogger("DeepSpeed"), Collect()
    logger.addHandler(handler)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, ...")
        logger.warning("a real warning")
    finally:
        logger.removeHandler(handler)
    assert seen == ["a real warning"]
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


def test_transformers_local_bars_are_off_unless_verbose(monkeypatch):
    from transformers.utils import logging as hf_logging

    from chatforge.cli import quiet

    def factory(*args, **kwargs):
        return ("a bar", kwargs["desc"])

    assert isinstance(
        quiet.skip_local_bars(factory, (range(2),), {"desc": "Loading weights"}), hf_logging.EmptyTqdm
    )
    assert isinstance(
        quiet.skip_local_bars(factory, (), {"desc": "Writing model shards"}), hf_logging.EmptyTqdm
    )
    assert quiet.skip_local_bars(factory, (), {"desc": "model.safetensors"}) == ("a bar", "model.safetensors")
    hooks = []
    monkeypatch.setattr(hf_logging, "set_tqdm_hook", hooks.append)
    monkeypatch.setenv("CHATFORGE_VERBOSE", "1")
    quiet.quiet_transformers()
    monkeypatch.delenv("CHATFORGE_VERBOSE")
    quiet.quiet_transformers()
    assert hooks == [quiet.skip_local_bars]


def test_ctrl_c_in_a_step_command_exits_130_and_says_how_to_resume(fixture_dir, tmp_path):
    from chatforge.fixtures import task_rows

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(120, seed=0)))
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "chatforge", "sft", f"model.name_or_path={fixture_dir / 'llama'}",
           f"data.datasets=[{data}]", f"train.output_dir={out}", "train.report_to=[none]",
           "batch.micro_batch_size=4", "batch.epochs=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (
        (out / "metrics.jsonl").is_file() and '"phase": "train"' in (out / "metrics.jsonl").read_text()
    ):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.splitlines()[-1] == (
        "chatforge sft: interrupted; rerun with --resume to continue from the last checkpoint"
    )
    assert "Traceback" not in stderr
