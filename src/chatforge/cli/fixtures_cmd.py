"""`chatforge fixtures`: write the offline tokenizer and tiny models."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "fixtures", help="write a local tokenizer and tiny Llama/OPT/GPT-2/Qwen2 models (offline)"
    )
    p.add_argument("--output-dir", required=True, help="where to write the model dirs")
    p.add_argument("--families", default="llama,opt,gpt2,qwen2", help="comma-separated model families")
    p.add_argument("--size", choices=("tiny", "small"), default="tiny", help="model size preset")
    p.add_argument("--seed", type=int, default=0, help="weight-init seed (same seed, same weights)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from chatforge.fixtures import write_fixtures

    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    paths = write_fixtures(args.output_dir, families=families, seed=args.seed, size=args.size)
    for name, path in paths.items():
        print(f"{name:16s} {path}")
    return 0
