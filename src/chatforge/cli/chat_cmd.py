"""`chatforge chat`: talk to a trained model in the terminal (or through piped stdin)."""

from __future__ import annotations


def add_model_args(p) -> None:
    """Loading options shared by `chat` and `serve`."""
    p.add_argument(
        "--model",
        required=True,
        help="model dir written by training (or a peft adapter dir), or a Hugging Face hub name ORG/NAME "
        "(from the local HF cache; downloaded if not there and HF_HUB_OFFLINE is unset)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on GPU), fp32, bf16 or fp16")
    p.add_argument(
        "--chat-template",
        default=None,
        help="Jinja chat-template file for tokenizers without one, or 'fallback' for '\\n\\nHuman: ... Assistant:'",
    )


def register(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a model in the terminal (streams tokens)")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt at the start of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated at most per reply")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--greedy", action="store_true", help="decode greedily (deterministic replies)")
    p.add_argument(
        "--seed", type=int, default=None, help="sampling seed of each reply (reproducible replies)"
    )
    p.set_defaults(handler=run)


def load_chat_model(args):
    """The `ChatModel` named by `add_model_args` options; a bad dir or template exits with a one-line error."""
    import sys
    from pathlib import Path

    from chatforge.inference import ChatModel

    try:
        template = args.chat_template
        if template and template != "fallback":
            template = Path(template).read_text()
        return ChatModel(args.model, device=args.device, dtype=args.dtype, chat_template=template)
    except (OSError, ValueError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        print(f"chatforge {args.command}: {lines[0]}", file=sys.stderr)
        raise SystemExit(2) from exc


def enable_line_editing() -> bool:
    """Arrow keys, Ctrl-R and history of this session for input(), through the stdlib readline (absent on
    some platforms: then plain input() still works, without editing)."""
    try:
        import readline
    except ImportError:
        return False
    readline.set_history_length(1000)
    readline.parse_and_bind("tab: self-insert")  # Tab types a tab; there is nothing to complete
    return True


def run(args) -> int:
    import sys

    from chatforge.inference.repl import HELP, read_lines, run_repl

    chat_model = load_chat_model(args)
    # A tiny or badly trained model can emit text a narrow terminal encoding cannot show; never crash on it.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    interactive = sys.stdin.isatty()
    if interactive:
        editing = "" if enable_line_editing() else " (no line editing: readline is unavailable)"
        print(f"chatting with {chat_model.name}; {HELP}{editing}", file=sys.stderr)
    gen = {
        "max_new_tokens": args.max_new_tokens,
        "fit_context": True,
        "temperature": 0.0 if args.greedy else args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    lines = read_lines(sys.stdin, "> " if interactive else None)
    return run_repl(chat_model, lines, sys.stdout, sys.stderr, system=args.system, gen=gen)
