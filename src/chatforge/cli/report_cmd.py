"""`chatforge report DIR`: write an HTML page with the training curves, config and versions."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="write an HTML report (plots, config, versions) of a pipeline or run dir"
    )
    p.add_argument("directory", metavar="DIR", help="pipeline output dir (with runs/) or one run dir")
    p.add_argument("--output", metavar="FILE", help="where to write the page (default: DIR/report.html)")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Exit 2 with one line when DIR is missing or holds no run (bad input, as in the other commands)."""
    from chatforge.report import build_report
    from chatforge.report.page import NoRunsError

    try:
        path = build_report(args.directory, args.output)
    except (FileNotFoundError, NoRunsError) as exc:
        print(f"chatforge report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
