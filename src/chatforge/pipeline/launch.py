"""Start one step's process (or its launcher) and wait for it, so that a failed step reads as one line.

A multi-process launcher (torchrun, deepspeed) answers a failed worker with its own report: log lines and a
ChildFailedError traceback of the launcher itself, 30+ lines that bury the step's one-line error. The
workers inherit the launcher's stderr, so it is read here through a pipe and passed on as it comes, until a
rank has written its error file (see `chatforge.cli.report_error`): what follows is the launcher's report
of that failure, and the parent prints the step's own line instead. A failure without an error file (a
crash, a kill) keeps the whole report.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

STOP_GRACE_S = 30  # how long a step may take to stop after Ctrl-C before it is killed


def launch(cmd: list[str], env: dict, error_file: Path, hide_launcher_report: bool) -> int:
    """Run `cmd` to its end; returns its exit code. On Ctrl-C (KeyboardInterrupt) the step is stopped
    the same way (SIGINT, so it can write nothing half) and the interrupt goes on."""
    if not hide_launcher_report:
        proc = subprocess.Popen(cmd, env=env)
        return _wait(proc)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    forward = threading.Thread(target=_forward_stderr, args=(proc.stderr, error_file), daemon=True)
    forward.start()
    code = _wait(proc)
    forward.join(timeout=STOP_GRACE_S)
    return code


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (a terminal's Ctrl-C reached it already; a signal sent to this process alone did not), then
    kill after a grace period."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _forward_stderr(stream, error_file: Path) -> None:
    """Copy the step's stderr to ours as it comes (progress bars need partial lines); drop what arrives
    after any rank wrote its error file."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        if _error_written(error_file):
            continue
        if out is not None:
            out.write(chunk)
            out.flush()
        else:
            sys.stderr.write(chunk.decode(errors="replace"))
    stream.close()


def _error_written(error_file: Path) -> bool:
    return error_file.is_file() or any(error_file.parent.glob(error_file.name + ".rank*"))
