"""The actor's inference mode: same tokens under ZeRO-3 on 2 ranks as in one process, one gather per
rollout and no collective per token, LoRA merged for generation and the training weights bit-identical after."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.dist_utils import launch

WORKER = str(Path(__file__).with_name("hybrid_worker.py"))


def _run(tmp: Path, model: Path, configs: str, nproc: int) -> list[dict]:
    out = tmp / f"hybrid-{nproc}"
    launch([WORKER, "--model", str(model), "--out", str(out), "--configs", configs],
           nproc=nproc, launcher="none" if nproc == 1 else "torchrun")  # fmt: skip
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def zero3(fixture_dir, tmp_path_factory) -> list[dict]:
    """One 2-process launch: ZeRO-3 with and without LoRA, and stage 0 with LoRA."""
    return _run(tmp_path_factory.mktemp("hybrid2"), fixture_dir / "llama", "3,3+lora4,0+lora4", 2)


@pytest.mark.multiproc
@pytest.mark.parametrize("spec", ["3", "3+lora4", "0+lora4"])
def test_rollout_tokens_equal_plain_model_in_one_process(zero3, spec):
    """Same seed: the inference mode's tokens equal those of the exported model run with no DeepSpeed."""
    for rank_result in zero3:
        got = rank_result[spec]
        assert got["short_tokens"] == got["reference_short_tokens"]
        assert got["long_tokens"] == got["reference_long_tokens"]
    # Rank 1 generated 4 more tokens than rank 0, which is legal only without per-token collectives.
    assert len(zero3[1][spec]["long_tokens"][0]) == len(zero3[0][spec]["long_tokens"][0]) + 4
    assert zero3[0][spec]["short_tokens"] == zero3[1][spec]["short_tokens"]


@pytest.mark.multiproc
@pytest.mark.parametrize("spec", ["3", "3+lora4"])
def test_zero3_gathers_once_per_rollout_not_per_token(zero3, spec):
    for rank_result in zero3:
        got = rank_result[spec]
        assert got["collectives_plain_forward"] > 0  # the counter does see ZeRO-3 traffic
        assert got["gathers_per_rollout"] == 1
        assert got["collectives_short"]["during_generate"] == 0
        assert got["collectives_long"]["during_generate"] == 0
        # 4 vs 12-16 new tokens: the rollout's collectives (enter + exit) do not depend on the length.
        assert got["collectives_short"]["total"] == got["collectives_long"]["total"] > 0
        assert got["training_after"] is True


@pytest.mark.multiproc
def test_without_bypass_deepspeed_hooks_regather_per_token(zero3):
    """The trap the inference mode avoids: inside a plain gather, ZeRO-3's hooks still talk per forward."""
    short, long = zero3[0]["3+lora4"]["unbypassed"]
    assert long > short


@pytest.mark.multiproc
@pytest.mark.parametrize("spec", ["3", "3+lora4", "0+lora4"])
def test_training_weights_bit_identical_after_rollout(zero3, spec):
    """LoRA merged for generation, then unmerged: the training weights (shards) come back bit for bit."""
    for rank_result in zero3:
        assert rank_result[spec]["weights_identical"]
        assert rank_result[spec]["training_after"] is True
