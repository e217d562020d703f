"""`chatforge serve`: an OpenAI-compatible HTTP server for a trained model."""

from __future__ import annotations

from chatforge.cli.chat_cmd import add_model_args


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)"
    )
    add_model_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)"
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $CHATFORGE_API_KEY, else no key)",
    )
    p.add_argument("--model-name", default=None, help="model id shown in /v1/models (default: the dir name)")
    p.add_argument(
        "--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="largest request body accepted (413 above)"
    )
    p.add_argument("--max-pending", type=int, default=64, help="requests queued at most before answering 429")
    p.set_defaults(handler=run)


def run(args) -> int:
    import os
    import sys

    import uvicorn

    from chatforge.cli.chat_cmd import load_chat_model
    from chatforge.inference.server import create_app

    chat_model = load_chat_model(args)
    # From the environment, the key stays out of `ps` listings and shell history.
    api_key = args.api_key or os.environ.get("CHATFORGE_API_KEY") or None
    app = create_app(
        chat_model,
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_pending=args.max_pending,
        model_name=args.model_name,
    )
    auth = "API key required" if api_key else "no API key"
    print(
        f"serving {args.model_name or chat_model.name} on http://{args.host}:{args.port} ({auth})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
