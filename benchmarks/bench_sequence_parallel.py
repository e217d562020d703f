"""Ulysses sequence parallelism: peak memory per process and step time, SP=1 vs SP=2, by sequence length.

    python benchmarks/bench_sequence_parallel.py --mem-cap-mb 1500

SP=1 runs one process on the whole sequence; SP=2 runs two processes, each holding half of every
sequence. Each run trains a random Llama-style model (built from a config, no download) for a few
steps at doubling sequence lengths, in increasing order, until a step's peak passes the cap.

Memory: peak resident set size of each process (`resource.getrusage(...).ru_maxrss`), the largest
over the processes of a run. Lengths run in increasing order in one process, so the figure at a
length is the peak of that length's steps (the peak grows with length). "over base" subtracts the
RSS after one 8-token step (libraries, weights, gradients, Adam moments), leaving what the sequence
costs: activations, logits and communication buffers. Step time: mean wall time of the
timed steps (forward, backward, optimizer step), after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
        max_position_embeddings=args.max_len, attn_implementation="sdpa",
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _train_step(engine, ids) -> None:
    """One SFT step on a (1, T) row: the sharded path under SP, the plain one without."""
    import torch

    from chatforge.algorithms import sft_loss
    from chatforge.engine.sequence_parallel import shard_batch, sharded_sft_loss, sp_model_inputs

    if engine.sp.enabled:
        local = shard_batch({"input_ids": ids, "labels": ids}, engine.sp)
        loss_sum, _ = sharded_sft_loss(engine(**sp_model_inputs(local)).logits, local["shift_labels"])
    else:
        loss_sum, _ = sft_loss(engine(input_ids=ids).logits, ids)
    engine.backward(loss_sum / ids.shape[1])
    engine.step()
    torch.distributed.barrier()


def _max_over_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(args) -> None:
    """Runs under torchrun with `--sp` processes; appends one JSON line per sequence length."""
    import torch

    from chatforge.engine import ModelSpec, TrainEngine

    torch.set_num_threads(args.threads)
    spec = ModelSpec(
        "bench", precision="fp32", sequence_parallel_size=args.sp, gradient_clipping=0.0, learning_rate=1e-5
    )
    engine = TrainEngine(lambda _dtype: _build_model(args), spec)
    # A tiny step first, so gradients and Adam's moments (created lazily) are part of the base.
    _train_step(engine, torch.zeros(1, 8, dtype=torch.long))
    base = _max_over_ranks(_rss_mb())
    length, out = args.min_len, Path(args.out)
    while length <= args.max_len:
        ids = torch.randint(0, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
        _train_step(engine, ids)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            _train_step(engine, ids)
        step_s = _max_over_ranks((time.perf_counter() - start) / args.steps)
        peak = _max_over_ranks(_peak_mb())
        if engine.dist.is_main:
            row = {
                "sp": args.sp,
                "seq_len": length,
                "peak_mb": peak,
                "over_base_mb": peak - base,
                "step_s": step_s,
            }
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if peak > args.mem_cap_mb:
            break
        length *= 2


def _launch(args, sp: int, out: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={sp}", f"--master_port={port}"]
    cmd += [__file__, "--worker", "--sp", str(sp), "--out", str(out)]
    for key in ("min_len", "max_len", "mem_cap_mb", "steps", "threads", "vocab", "hidden", "layers", "heads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions")
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"SP={sp} run failed:\n{proc.stderr[-4000:]}")


def report(rows: list[dict], cap: float) -> str:
    """The table: one line per length, SP=1 and SP=2 side by side, then the longest fitting lengths."""
    by = {(r["sp"], r["seq_len"]): r for r in rows}
    lines = [
        f"{'seq_len':>8} | {'SP=1 peak MB':>12} {'over base':>9} {'step s':>7} | "
        f"{'SP=2 peak MB':>12} {'over base':>9} {'step s':>7} | {'mem ratio':>9}"
    ]
    for length in sorted({r["seq_len"] for r in rows}):
        cells = []
        for sp in (1, 2):
            r = by.get((sp, length))
            cells.append(
                f"{r['peak_mb']:>12.0f} {r['over_base_mb']:>9.0f} {r['step_s']:>7.2f}"
                if r
                else f"{'-':>12} {'-':>9} {'-':>7}"
            )
        one, two = by.get((1, length)), by.get((2, length))
        ratio = f"{two['over_base_mb'] / one['over_base_mb']:>9.2f}" if one and two else f"{'-':>9}"
        lines.append(f"{length:>8} | {cells[0]} | {cells[1]} | {ratio}")
    for sp in (1, 2):
        fits = [r["seq_len"] for r in rows if r["sp"] == sp and r["peak_mb"] <= cap]
        lines.append(
            f"longest sequence under {cap:.0f} MB per process, SP={sp}: {max(fits) if fits else 'none'}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mem-cap-mb", type=float, default=1500.0, help="peak RSS cap per process")
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=32768)
    p.add_argument("--steps", type=int, default=2, help="timed steps per length (after 1 warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        for sp in (1, 2):
            _launch(args, sp, out)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(
        f"Llama-style model: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.heads} heads; "
        f"fp32, ZeRO-0, batch 1, {args.threads} torch thread(s) per process"
    )
    print(report(rows, args.mem_cap_mb))


if __name__ == "__main__":
    main()
