"""`chatforge` command line. Each subcommand lives in its own light module here; heavy libraries
(torch, transformers, deepspeed) are imported only inside the handlers, so `chatforge --help` is instant.

One error boundary for every command: bad input (a setting, a data file, a model dir, a reward function)
is one line naming the culprit and the fix with exit code 2; a crash is one line with exit code 1 (the
traceback with --debug or CHATFORGE_DEBUG=1); Ctrl-C is 130. Libraries' progress bars and notices are off
unless CHATFORGE_VERBOSE=1 (see quiet.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import sys

# Modules under chatforge.cli that define `register(subparsers)`; order = order in --help.
COMMAND_MODULES = (
    "fixtures_cmd",
    "data_cmd",
    "train_cmds",
    "pipeline_cmds",
    "chat_cmd",
    "serve_cmd",
    "report_cmd",
)
BAD_INPUT, CRASH, INTERRUPTED = 2, 1, 130
STEP_COMMANDS = ("sft", "reward", "ppo", "dpo")


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in one line (by default it prints the whole usage first: 10 lines for `train`)."""

    def error(self, message: str):
        self.exit(BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from chatforge import __version__

    parser = OneLineParser(
        prog="chatforge",
        description="RLHF for any Hugging Face causal LM: SFT -> reward model -> RL (PPO, GRPO, RLOO, "
        "REINFORCE++) or DPO, then chat and serve.",
    )
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    # The deepspeed launcher appends --local_rank=N right after the program; LOCAL_RANK is in the env too.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"chatforge.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .quiet import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand's parser, so the line points at its --help
        subcommands = parser._subparsers._group_actions[0].choices
        subcommands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "handler", None):
        parser.print_usage(sys.stderr)
        print("chatforge: error: give a command (chatforge --help lists them)", file=sys.stderr)
        return BAD_INPUT
    if args.debug:
        os.environ["CHATFORGE_DEBUG"] = "1"  # the steps `chatforge train` starts show theirs too
    debug = os.environ.get("CHATFORGE_DEBUG") == "1"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        report_error(args.command, INTERRUPTED, "interrupted" + resume_hint(args.command, "; "))
        return INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:
        if debug:
            raise
        code, line = describe_error(exc, args.command)
        report_error(args.command, code, line)
        return code


def resume_hint(command: str, sep: str) -> str:
    """How to continue after an interruption or a full disk (empty where resuming is not a thing)."""
    if os.environ.get("CHATFORGE_PIPELINE_STEP") or command == "train":
        return f"{sep}rerun the same chatforge train command to resume from the last checkpoint"
    if command in STEP_COMMANDS:
        return f"{sep}rerun with --resume to continue from the last checkpoint"
    return ""


def describe_error(exc: BaseException, command: str = "") -> tuple[int, str]:
    """(exit code, one line) for an exception that ends a command."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        if getattr(exc, "described", False):  # a DiskFullError already names the dir and the kept checkpoint
            return CRASH, text + resume_hint(command, ". Fix: free space, then ")
        where = exc.filename or "the output dir"
        return CRASH, f"no space left on the device of {where}. Fix: free space" + resume_hint(
            command, ", then "
        )
    code = getattr(exc, "exit_code", None)
    if code is not None:
        return code, text or type(exc).__name__
    if _is_bad_input(exc):
        return BAD_INPUT, text or type(exc).__name__
    return CRASH, f"crashed with {type(exc).__name__}: {text} (rerun with --debug for the traceback)"


def _is_bad_input(exc: BaseException) -> bool:
    from chatforge.config import ConfigError

    if isinstance(exc, ConfigError):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    known = {"DataError", "ModelLoadError", "RunDirError", "RewardFunctionError", "ChatTemplateError"}
    if names & known:
        return True
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def report_error(command: str, code: int, line: str) -> None:
    """Print `chatforge COMMAND: line`. Under `chatforge train` (CHATFORGE_ERROR_FILE set) hand the line and
    code to the parent instead, which prints it once with the step's name: every rank writes its own file,
    so several ranks failing alike do not print the same line several times, and the launcher's own report
    of the failure cannot bury it."""
    _end_progress_bars()
    path = os.environ.get("CHATFORGE_ERROR_FILE")
    if path:
        rank = os.environ.get("RANK", "0")
        try:
            with open(path if rank == "0" else f"{path}.rank{rank}", "w") as f:
                json.dump({"code": code, "line": line, "rank": int(rank)}, f)
            return
        except OSError:
            pass
    print(f"chatforge {command}: {line}", file=sys.stderr)


def _end_progress_bars() -> None:
    """Close a progress bar an error interrupted, so the error starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        with contextlib.suppress(Exception):  # a half-torn bar must not hide the error
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
