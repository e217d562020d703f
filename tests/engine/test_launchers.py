"""The same tiny training under the `deepspeed` launcher and `accelerate launch` (2 processes) gives the
losses of one process started without any launcher.

Equal losses alone would not prove the launch worked: 2 processes that each believe they are alone
train on the whole batch and report the single-process losses too. So this file, run as a script, first
records how each process sees the job, then hands over to engine_worker.py.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("engine_worker.py")
PROBE_DIR_ENV = "CHATFORGE_TEST_PROBE_DIR"
# fp32 on CPU: the 2-rank gradient all-reduce changes summation order, so agreement is ~1e-6, not bitwise.
LOSS_TOL = 1e-5


def _run(tmp: Path, model: Path, launcher: str, nproc: int) -> tuple[list[float], list[dict]]:
    """(losses of the ZeRO-2 run, one {rank, world_size, local_rank} per process)."""
    from tests.dist_utils import launch

    out, probes = tmp / f"losses-{launcher}.json", tmp / f"probes-{launcher}"
    probes.mkdir()
    args = [__file__, "losses", "--model", str(model), "--out", str(out), "--configs", "2"]
    launch(args, nproc=nproc, launcher=launcher, env={PROBE_DIR_ENV: str(probes)})
    seen = [json.loads(p.read_text()) for p in sorted(probes.iterdir())]
    return json.loads(out.read_text())["2"], seen


@pytest.fixture(scope="module")
def reference(fixture_dir, tmp_path_factory) -> list[float]:
    losses, seen = _run(tmp_path_factory.mktemp("none"), fixture_dir / "llama", "none", 1)
    assert seen == [{"rank": 0, "world_size": 1, "local_rank": 0}]
    assert losses[-1] < losses[0]  # it trains at all
    return losses


@pytest.mark.multiproc
@pytest.mark.parametrize("launcher", ["deepspeed", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_processes_under_launcher_match_one_without(launcher, reference, fixture_dir, tmp_path):
    losses, seen = _run(tmp_path, fixture_dir / "llama", launcher, 2)
    assert seen == [
        {"rank": 0, "world_size": 2, "local_rank": 0},
        {"rank": 1, "world_size": 2, "local_rank": 1},
    ]
    assert losses == pytest.approx(reference, abs=LOSS_TOL)


ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launch_env(monkeypatch):
    """A clean slate of launcher variables; returns a function that sets some and fills the rest."""
    from chatforge.engine.distributed import _OPEN_MPI_VARS, _fill_launcher_env

    for name in (*ENV_VARS, *_OPEN_MPI_VARS.values()):
        monkeypatch.delenv(name, raising=False)

    def fill(**given: str) -> dict[str, str]:
        for name, value in given.items():
            monkeypatch.setenv(name, value)
        _fill_launcher_env()
        return {name: os.environ[name] for name in ENV_VARS}

    return fill


def test_no_launcher_is_rank_0_of_1(launch_env):
    env = launch_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    assert int(env["MASTER_PORT"]) > 0


def test_launcher_variables_are_kept(launch_env):
    # What `accelerate launch --multi_gpu` exports on a CPU box (the deepspeed launcher sets the same).
    given = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.5", MASTER_PORT="29512")
    assert launch_env(**given) == given


def test_open_mpi_ranks_are_translated(launch_env):
    mpi = dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1")
    env = launch_env(**mpi, MASTER_ADDR="10.0.0.5", MASTER_PORT="29512")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")


def test_several_ranks_without_a_master_port_fail_loudly(launch_env):
    # Each rank would pick its own free port and the rendezvous would hang until the timeout.
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        launch_env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2")


def _record_rank_then_train() -> None:
    """Entry point under a launcher: note this process's place in the job, then run the engine worker."""
    from chatforge.engine import init_distributed

    info = init_distributed()  # idempotent: the worker's own call reuses this process group
    probe = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank}
    (Path(os.environ[PROBE_DIR_ENV]) / f"rank{info.rank}.json").write_text(json.dumps(probe))
    sys.argv = [str(WORKER), *sys.argv[1:]]
    runpy.run_path(str(WORKER), run_name="__main__")


if __name__ == "__main__":
    _record_rank_then_train()
