"""`chatforge data inspect SPEC...`: show how chatforge reads, splits and tokenises datasets."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect training data (formats, step splits, token lengths)")
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    q = actions.add_parser("inspect", help="print the detected format, rows per step, token stats, examples")
    q.add_argument(
        "specs", nargs="+", metavar="SPEC", help="dataset spec(s) 'name_or_path[:weight][:sft|:prompts]'"
    )
    q.add_argument(
        "--tokenizer", help="tokenizer dir or hub name; adds token-length stats and rendered examples"
    )
    q.add_argument("--format", default="auto", help="row format (default: detected from the columns)")
    q.add_argument("--data-split", default="2,4,4", help="shares of steps 1,2,3 (default 2,4,4)")
    q.add_argument("--eval-fraction", type=float, default=0.05, help="share of each step part held out")
    q.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens kept (from the left)")
    q.add_argument("--max-length", type=int, default=512, help="prompt + response tokens kept")
    q.add_argument("--packing", action="store_true", help="pack SFT/PTX rows")
    q.add_argument("--cache-dir", help="tokenised-data cache (default: a temporary dir, removed afterwards)")
    q.set_defaults(handler=run_inspect)


def run_inspect(args) -> int:
    from chatforge.config import ConfigError
    from chatforge.data.inspect import inspect_report
    from chatforge.data.pipeline import DataSettings

    try:
        split = [float(x) for x in args.data_split.split(",")]
    except ValueError:
        raise ConfigError(f"--data-split takes 3 numbers like 2,4,4, got {args.data_split!r}") from None
    cfg = DataSettings.of(
        None,
        datasets=list(args.specs),
        data_split=split,
        eval_fraction=args.eval_fraction,
        format=args.format,
        max_prompt_length=args.max_prompt_length,
        max_length=args.max_length,
        packing=args.packing,
    )
    tokenizer = None
    if args.tokenizer:
        from chatforge.models.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, model_dir=False)
    print(inspect_report(cfg, tokenizer, cache_dir=args.cache_dir))
    return 0
