"""Process-group set-up that works under deepspeed, torchrun, accelerate launch, or no launcher at all."""

from __future__ import annotations

import contextlib
import io
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Open MPI (mpirun, `deepspeed --launcher openmpi`) names the ranks its own way; torch reads these.
_OPEN_MPI_VARS = {
    "RANK": "OMPI_COMM_WORLD_RANK",
    "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
    "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK",
}


def _fill_launcher_env() -> None:
    """Complete the env:// variables; without a launcher, act as rank 0 of 1 (DeepSpeed would try MPI).

    torchrun, the deepspeed launcher and `accelerate launch --multi_gpu` export all of them already.
    """
    for ours, mpi in _OPEN_MPI_VARS.items():
        if mpi in os.environ:
            os.environ.setdefault(ours, os.environ[mpi])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" in os.environ:
        return
    if int(os.environ["WORLD_SIZE"]) > 1:
        # A port picked here would differ on every rank and the rendezvous would hang.
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but MASTER_PORT is not set: export MASTER_ADDR and "
            "MASTER_PORT, or start with torchrun, deepspeed or accelerate launch"
        )
    os.environ["MASTER_PORT"] = str(_free_port())


def configure_threads(local_world_size: int) -> int:
    """Torch threads per process: $CHATFORGE_THREADS, else $OMP_NUM_THREADS when a launcher or the user set
    it, else the machine's cores shared by this node's processes (several processes each using every core
    slow each other down several times). Returns the count set."""
    chosen = os.environ.get("CHATFORGE_THREADS") or os.environ.get("OMP_NUM_THREADS")
    threads = (
        int(chosen) if chosen and chosen.isdigit() else max(1, (os.cpu_count() or 1) // local_world_size)
    )
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def _deepspeed_comm_ready() -> bool:
    from deepspeed import comm

    return comm.is_initialized()


def backend_name() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 30) -> DistInfo:
    """Initialise torch.distributed once (idempotent) and return this process's place in the job."""
    import deepspeed

    _fill_launcher_env()
    if not dist.is_initialized() and os.environ["WORLD_SIZE"] == "1":
        # Alone, rendezvous in memory: a TCP store on a port picked earlier can lose it to another process.
        dist.init_process_group(
            backend_name(),
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if not dist.is_initialized() or not _deepspeed_comm_ready():
        # DeepSpeed prints "... deepspeed_shm_comm_op built successfully" on every start (CHATFORGE_VERBOSE=1
        # shows it); a first build's compiler output comes from a subprocess and is not hidden.
        quiet = os.environ.get("CHATFORGE_VERBOSE") != "1"
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            deepspeed.init_distributed(
                dist_backend=backend_name(),
                auto_mpi_discovery=False,
                verbose=False,
                timeout=timedelta(minutes=timeout_minutes),
            )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    configure_threads(int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (returns a new tensor; a no-op when not distributed)."""
    out = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
