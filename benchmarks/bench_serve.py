"""Completion throughput of `chatforge serve`, batched vs one request at a time, measured in one run.

    .venv/bin/python benchmarks/bench_serve.py --concurrency 1,8,32 --max-tokens 32

Two servers run the same fixture model (random weights, so replies are not empty): one batching
(`--max-batch-size`, default 32) and one with `--max-batch-size 1`, which decodes one request at a time as
the server did before batching. For each concurrency C, C clients each send ceil(--requests / C) greedy
chat completions back to back (different prompts); the two servers are loaded in turn (never at once),
alternating which goes first, --repeats times; the best run of each is kept. Both servers must return the
same replies (greedy decoding is batch-independent), which is checked and printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="llama", choices=["llama", "opt", "gpt2", "qwen2"])
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of clients")
    parser.add_argument(
        "--requests", type=int, default=48, help="requests per run at least (split over the clients)"
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--batch-size", type=int, default=32, help="--max-batch-size of the batched server")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=50.0,
        help="--batch-wait-ms of the batched server (its default)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per (concurrency, server)")
    return parser.parse_args()


def write_model(out: Path, family: str, size: str) -> Path:
    """A fixture model with N(0, 0.5) weights: its greedy replies are long and differ per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.fixtures import write_fixtures

    paths = write_fixtures(out / "fixtures", families=(family,), size=size)
    model_dir = out / "model"
    shutil.copytree(paths[family], model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(str(model_dir))
    return model_dir


def start_server(
    model_dir: Path, port: int, batch_size: int, args: argparse.Namespace, log: Path
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "chatforge.cli", "serve", "--model", str(model_dir), "--port", str(port),
        "--max-batch-size", str(batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
        "--max-pending", "10000", "--max-connections", "10000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("CHATFORGE_API_KEY", None)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(client_id: int, i: int, max_tokens: int) -> dict:
    text = f"Client {client_id} asks question {i}: what is {client_id * 7 + i} + {i * 3}?"
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": max_tokens}


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> tuple[float, int, dict, float]:
    """(seconds, completion tokens, {(client, i): reply}, mean rows per decoded batch) for `clients`
    closed-loop clients."""
    replies: dict[tuple[int, int], str] = {}
    tokens = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient, cid: int) -> None:
        nonlocal tokens
        for i in range(per_client):
            r = await http.post("/v1/chat/completions", json=request(cid, i, max_tokens))
            r.raise_for_status()
            body = r.json()
            replies[(cid, i)] = body["choices"][0]["message"]["content"]
            tokens += body["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        before = (await http.get("/stats")).json()
        start = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        seconds = time.perf_counter() - start
        after = (await http.get("/stats")).json()
    rows_per_batch = (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"])
    return seconds, tokens, replies, rows_per_batch


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp), args.family, args.size)
        modes = {"batched": args.batch_size, "one-at-a-time": 1}
        ports = {mode: free_port() for mode in modes}
        procs = {
            mode: start_server(model_dir, ports[mode], size, args, Path(tmp) / f"{mode}.log")
            for mode, size in modes.items()
        }
        try:
            run_levels(args, levels, {mode: f"http://127.0.0.1:{port}" for mode, port in ports.items()})
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(timeout=30)


def run_levels(args: argparse.Namespace, levels: list[int], urls: dict[str, str]) -> None:
    for url in urls.values():  # warm-up: first requests pay for lazy initialisation
        asyncio.run(load(url, 2, 1, args.max_tokens))
    print(
        f"family={args.family} size={args.size} max_tokens={args.max_tokens} greedy, "
        f">= {args.requests} requests per run, torch threads/server={args.threads}, "
        f"batched --max-batch-size {args.batch_size} --batch-wait-ms {args.batch_wait_ms:g}, "
        f"best of {args.repeats} interleaved runs"
    )
    header = f"{'clients':>7} {'server':>14} {'tok/s':>8} {'req/s':>7} {'ratio':>6} {'rows/batch':>10}"
    print(f"{header} {'same replies':>12}")
    for clients in levels:
        per_client = -(-args.requests // clients)
        best: dict[str, tuple[float, int, dict, float]] = {}
        for repeat in range(args.repeats):
            order = list(urls) if repeat % 2 == 0 else list(reversed(urls))
            for mode in order:
                result = asyncio.run(load(urls[mode], clients, per_client, args.max_tokens))
                if mode not in best or result[0] < best[mode][0]:
                    best[mode] = result
        same = best["batched"][2] == best["one-at-a-time"][2]
        n_requests = clients * per_client
        rates = {mode: (tokens / secs, n_requests / secs) for mode, (secs, tokens, _, _) in best.items()}
        for mode, (tps, rps) in rates.items():
            ratio = tps / rates["one-at-a-time"][0]
            rows = best[mode][3]
            print(
                f"{clients:>7} {mode:>14} {tps:>8.1f} {rps:>7.2f} {ratio:>5.2f}x {rows:>10.1f} {same!s:>12}"
            )


if __name__ == "__main__":
    main()
