"""Launch a script on several local processes (torchrun, deepspeed or accelerate), as users would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, launcher: str = "torchrun", timeout: int = 600, env=None):
    """Run `args` (a script path + its arguments) on `nproc` processes; raise with the output on failure."""
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={port}",
        ]
    elif launcher == "deepspeed":
        # On CPU --num_gpus is the process count per node. --no_local_rank: otherwise the launcher appends
        # --local_rank=N to the script's arguments (LOCAL_RANK is in the environment either way).
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}", "--no_local_rank"]
    elif launcher == "accelerate":
        # --multi_gpu also on CPU: it selects accelerate's torchrun path, which exports RANK, WORLD_SIZE,
        # LOCAL_RANK and MASTER_*; without it (or with --cpu) a CPU box gets one process only.
        cmd = [str(BIN / "accelerate"), "launch", f"--num_processes={nproc}", "--num_machines=1"]
        cmd += ["--multi_gpu", f"--main_process_port={port}", "--mixed_precision=no", "--dynamo_backend=no"]
    elif launcher == "none":
        cmd = [sys.executable]
    else:
        raise ValueError(launcher)
    full_env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd + args)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
