"""`chatforge --help` is instant: the CLI imports torch, transformers and deepspeed only inside handlers."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHATFORGE = str(Path(sys.executable).parent / "chatforge")
HEAVY = ("torch", "transformers", "deepspeed", "peft", "datasets", "accelerate")


def _run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return time.perf_counter() - start, proc


def test_help_exits_0_in_under_a_second():
    runs = [_run([CHATFORGE, "--help"]) for _ in range(3)]
    for _, proc in runs:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: chatforge")
        assert "fixtures" in proc.stdout  # the subcommands are registered, not skipped to be fast
    median = statistics.median(seconds for seconds, _ in runs)
    assert median < 1.0, f"chatforge --help took {median:.2f}s (median of 3)"


def _heavy_modules_after(code: str) -> list[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_cli_imports_no_heavy_library():
    assert _heavy_modules_after("import chatforge.cli") == []


def test_building_the_parser_imports_no_heavy_library():
    # --help builds the full parser, so every subcommand module is imported: they must stay light too.
    assert _heavy_modules_after("from chatforge.cli import build_parser; build_parser()") == []
