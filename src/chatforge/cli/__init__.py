"""`chatforge` command line. Each subcommand lives in its own light module here; heavy libraries
(torch, transformers, deepspeed) are imported only inside the handlers, so `chatforge --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    from chatforge import __version__

    parser = argparse.ArgumentParser(
        prog="chatforge",
        description="RLHF for any Hugging Face causal LM: SFT -> reward model -> PPO, then chat and serve.",
    )
    parser.add_argument("--version", action="version", version=f"chatforge {__version__}")
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
        parser.print_help()
        return 0
    from chatforge.config import ConfigError

    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        print(f"chatforge {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chatforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
