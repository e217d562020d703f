"""`chatforge report DIR`: write an HTML page with the training curves, config and versions."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "report", help="write an HTML report (plots, config, versions) of a pipeline or run dir"
    )
    p.add_argument("directory", metavar="DIR", help="pipeline output dir (with runs/) or one run dir")
    p.add_argument("--output", metavar="FILE", help="where to write the page (default: DIR/report.html)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from chatforge.report import build_report

    path = build_report(args.directory, args.output)  # a missing dir: FileNotFoundError, exit code 2
    print(path)
    return 0
