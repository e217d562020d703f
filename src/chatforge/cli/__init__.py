"""`chatforge` command line. Each subcommand lives in its own light module here; heavy libraries
(torch, transformers, deepspeed) are imported only inside the handlers, so `chatforge --help` is instant.

One error boundary for every command: bad input (a setting, a data file, a model dir, a reward function)
is one line naming the culprit and the fix with exit code 2; a crash is one line with exit code 1 (the
traceback with --debug or CHATFORGE_DEBUG=1); Ctrl-C is 130.
"""

from __future__ import annotations

import argparse
import errno
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    from chatforge import __version__

    parser = argparse.ArgumentParser(
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_usage(sys.stderr)
        print("chatforge: error: give a command (chatforge --help lists them)", file=sys.stderr)
        return BAD_INPUT
    debug = args.debug or os.environ.get("CHATFORGE_DEBUG") == "1"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:
        if debug:
            raise
        code, line = describe_error(exc)
        report_error(f"chatforge {args.command}: {line}")
        return code


def describe_error(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for an exception that ends a command."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = exc.filename or "the output dir"
        return CRASH, (
            f"no space left on the device of {where}; the last complete checkpoint is kept. Free space and "
            "rerun the same command to resume"
        )
    if _is_bad_input(exc):
        return BAD_INPUT, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
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


def report_error(line: str) -> None:
    """Print the line; under `chatforge train` also hand it to the parent, which prints it once (a
    multi-process step's launcher would otherwise bury it)."""
    print(line, file=sys.stderr)
    path = os.environ.get("CHATFORGE_ERROR_FILE")
    if path and os.environ.get("RANK", "0") == "0":
        try:
            with open(path, "w") as f:
                f.write(line + "\n")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
