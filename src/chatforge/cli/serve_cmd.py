"""`chatforge serve`: an OpenAI-compatible HTTP server for a trained model.

Everything that can be checked without the model (the API key, the limits, binding the address) is checked
first, so a bad setting fails in a second with one line instead of after loading the weights.
"""

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
    p.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* and /stats (default: $CHATFORGE_API_KEY, else "
        "no key); "
        "an empty key is refused",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="model id shown in /v1/models (default: the dir name, or the hub name)",
    )
    p.add_argument(
        "--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for"
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1_000_000, help="largest request body accepted (413 above)"
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may take to arrive (408 after)",
    )
    p.add_argument(
        "--max-pending", type=int, default=64, help="requests in flight at most before answering 429"
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="open connections at most; more get 503 (uvicorn's limit_concurrency)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=16,
        help="requests decoded together at most (1 = one at a time, no batching)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=50.0,
        help="under load, wait up to this long (at most half the previous batch's time) for more requests "
        "before starting a batch",
    )
    p.set_defaults(handler=run)


def fail(message: str) -> None:
    import sys

    print(f"chatforge serve: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_api_key(flag: str | None) -> str | None:
    """The key from --api-key, else $CHATFORGE_API_KEY, else None (an open server). An empty or blank
    key is what `--api-key "$KEY"` gives when KEY is unset: refused, never taken as 'no key'."""
    import os

    if flag is not None:
        source, key = "--api-key", flag
    elif os.environ.get("CHATFORGE_API_KEY") is not None:
        source, key = "CHATFORGE_API_KEY", os.environ["CHATFORGE_API_KEY"]
    else:
        return None
    if not key.strip():
        fail(
            f"{source} is empty (an unset shell variable?): pass a non-empty key, or leave out both "
            "--api-key and CHATFORGE_API_KEY to serve without a key"
        )
    if key != key.strip():
        fail(f"{source} starts or ends with whitespace, which no client can send back: remove it")
    return key


def check_limits(args) -> None:
    if not 1 <= args.port <= 65535:
        fail(f"--port must be between 1 and 65535, got {args.port}")
    positive = {
        "--max-tokens-limit": args.max_tokens_limit,
        "--max-body-bytes": args.max_body_bytes,
        "--body-timeout": args.body_timeout,
        "--max-connections": args.max_connections,
        "--max-batch-size": args.max_batch_size,
    }
    for flag, value in positive.items():
        if not value > 0:
            fail(f"{flag} must be > 0, got {value}")
    if args.max_pending < 0 or args.batch_wait_ms < 0:
        fail("--max-pending and --batch-wait-ms must be >= 0")


def listening_socket(host: str, port: int):
    """A socket bound to (host, port) and listening; uvicorn serves on it after the model has loaded."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        fail(f"cannot use --host {host}: {exc.strerror}")
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another process listens there: pick another --port or stop it",
            errno.EADDRNOTAVAIL: "this machine has no such address: use 127.0.0.1, 0.0.0.0 or one of its own",
            errno.EACCES: "ports below 1024 need privileges: pick a port above 1023",
        }.get(exc.errno, "check --host and --port")
        fail(f"cannot listen on {host}:{port}: {exc.strerror} ({hint})")
    return sock


def run(args) -> int:
    import logging
    import sys

    api_key = resolve_api_key(args.api_key)
    check_limits(args)
    sock = listening_socket(args.host, args.port)

    import uvicorn

    from chatforge.cli.chat_cmd import load_chat_model
    from chatforge.inference.server import create_app

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("chatforge").addHandler(handler)
    chat_model = load_chat_model(args)
    app = create_app(
        chat_model,
        api_key=api_key,
        max_tokens_limit=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_pending=args.max_pending,
        model_name=args.model_name,
        max_batch_size=args.max_batch_size,
        batch_wait_s=args.batch_wait_ms / 1000,
        body_timeout_s=args.body_timeout,
    )
    auth = "API key required" if api_key else "no API key: anyone who reaches the address can use it"
    print(
        f"serving {args.model_name or chat_model.name} on http://{args.host}:{args.port} ({auth})",
        file=sys.stderr,
    )
    config = uvicorn.Config(app, log_level="warning", limit_concurrency=args.max_connections)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
