"""Ulysses sequence parallelism: SP=2 on 2 processes equals single-process full-sequence training.

Tolerances (fp32 on CPU): logits, log-probs, entropies, values, reward scores and losses within 1e-5
absolute; full gradients within 1e-6 absolute (their largest entries are ~0.2); trainer curves within a
relative 1e-5 (perplexities are ~100: an absolute 1e-5 there would demand 1e-7 relative agreement).
Observed: logits bitwise equal, gradients within 6e-8. Step 3's verbs (response log-probs at a sampling
temperature with entropy, critic values, a policy-gradient backward) are checked the same way ("rl",
"value" cases); tests/trainers/test_ppo_dist.py runs the whole step-3 trainer at SP=2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatforge.engine.distributed import DistInfo
from chatforge.engine.sequence_parallel import (
    KEY_MASK_KWARG,
    SequenceParallelError,
    SPLayout,
    check_model,
    enable_ulysses,
    full_sequence_attention,
    init_sequence_parallel,
    reject_packing,
    shard_batch,
    zero3_loss_factor,
)
from tests.dist_utils import launch

WORKER = str(Path(__file__).with_name("sp_worker.py"))
OUTPUT_TOL, GRAD_TOL, CURVE_TOL = 1e-5, 1e-6, 1e-5
# family-kind-zero stage-LoRA rank-padding side: Llama and Qwen2, ZeRO 0-3, LoRA, reward models,
# right padding (causal attention alone) and left padding (the key-padding mask path).
CASES = (
    "llama-lm-z0-lora0-right", "llama-lm-z3-lora0-left", "qwen2-lm-z0-lora0-left",
    "qwen2-lm-z3-lora0-right", "llama-lm-z1-lora0-left", "llama-lm-z2-lora4-right",
    "llama-reward-z0-lora0-right", "qwen2-reward-z3-lora0-left",
    "llama-rl-z0-lora0-left", "qwen2-rl-z3-lora4-left", "llama-value-z2-lora0-left",
)  # fmt: skip


def _layout(rank: int, size: int = 2) -> SPLayout:
    return SPLayout(size=size, sp_rank=rank, dp_rank=0, dp_world_size=1)


def _tiny_llama(heads: int = 4, kv_heads: int = 2, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv_heads, **extra,
    )  # fmt: skip
    return LlamaForCausalLM(config)


# --- 2 processes against the single-process full sequence ------------------------------------------
@pytest.mark.multiproc
def test_sp2_logits_loss_scores_and_gradients_match_full_sequence(fixture_dir, tmp_path):
    out = tmp_path / "equivalence.json"
    launch(
        [WORKER, "equivalence", "--fixtures", str(fixture_dir), "--out", str(out), "--cases", ",".join(CASES)]
    )
    results = json.loads(out.read_text())
    assert set(results) == set(CASES)
    for name, diffs in results.items():
        keys = ("logits", "logprobs", "entropy", "values", "scores", "loss")
        outputs = {k: v for k, v in diffs.items() if k in keys}
        assert outputs and max(outputs.values()) <= OUTPUT_TOL, (name, diffs)
        assert diffs["grad"] <= GRAD_TOL, (name, diffs)
        assert diffs["grad_scale"] > 1e-2, (name, diffs)  # the gradients compared are not all ~0


@pytest.mark.slow  # ~45 s; the one-step equivalence above stays in the default suite
@pytest.mark.multiproc
def test_sp2_sft_and_reward_training_follow_the_sp1_curves(fixture_dir, tmp_path):
    from chatforge.fixtures import task_rows

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows(160)))
    out = tmp_path / "curves.json"
    args = [WORKER, "trainers", "--fixtures", str(fixture_dir), "--out", str(out), "--data", str(data)]
    launch(args + ["--work", str(tmp_path / "runs"), "--stage", "3", "--steps", "5"])
    curves = json.loads(out.read_text())
    for step in ("sft", "reward"):
        one, two = curves[f"{step}-sp1"], curves[f"{step}-sp2"]
        assert len(one["loss"]) == 5
        assert two["loss"] == pytest.approx(one["loss"], rel=CURVE_TOL, abs=1e-7), step
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), step
        # The reward margin is a difference of O(1) scores: its error is absolute, at the scores' fp32 scale.
        assert two["final"] == pytest.approx(one["final"], rel=CURVE_TOL, abs=OUTPUT_TOL), step
    assert curves["sft-sp1"]["loss"][-1] < curves["sft-sp1"]["loss"][0] - 0.5  # it trains
    stats = [
        json.loads((tmp_path / "runs" / f"reward-sp{sp}/model/reward_stats.json").read_text())
        for sp in (1, 2)
    ]
    assert stats[1]["count"] == stats[0]["count"]  # each eval pair counted once under SP
    # Mean and std of O(1) scores: errors at the scores' fp32 scale, not relative to a small std.
    moments = [[*st["mean"], *st["std"]] for st in stats]
    assert moments[1] == pytest.approx(moments[0], rel=CURVE_TOL, abs=OUTPUT_TOL)
    # The exported model is a plain HF model: Ulysses' attention key is not saved.
    assert "chatforge_ulysses" not in (tmp_path / "runs" / "sft-sp2/model/config.json").read_text()


# --- batch sharding ---------------------------------------------------------------------------------
def test_shard_batch_pads_to_a_multiple_of_p_and_keeps_global_positions_and_shifted_labels():
    ids = torch.arange(1, 8).repeat(2, 1)  # (2, 7)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = torch.where(mask.bool(), ids, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "reward": torch.ones(2)}
    shards = [shard_batch(batch, _layout(r)) for r in range(2)]
    assert all(s["input_ids"].shape == (2, 4) for s in shards)  # 7 -> 8 = 2 x 4
    joined = {
        k: torch.cat([s[k] for s in shards], dim=1) for k in ("input_ids", "position_ids", "shift_labels")
    }
    assert joined["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
    assert joined["position_ids"][0].tolist() == list(range(7)) + [6]
    # Rank 0's last token (position 3) is labelled with rank 1's first token: the shift crosses shards.
    assert shards[0]["shift_labels"][0].tolist() == [2, 3, 4, 5]
    assert joined["shift_labels"][1].tolist() == [2, 3, 4, 5, -100, -100, -100, -100]
    assert "labels" not in shards[0] and shards[0]["reward"].shape == (2,)  # non-token tensors untouched
    assert KEY_MASK_KWARG not in shards[0]  # right padding: causal attention alone is exact


def test_shard_batch_sends_the_padding_mask_only_for_left_padding():
    ids = torch.arange(1, 7).repeat(2, 1)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    local = shard_batch({"input_ids": ids, "attention_mask": mask}, _layout(1))
    assert local[KEY_MASK_KWARG].tolist() == mask.bool().tolist()
    assert local["position_ids"][1].tolist() == [1, 2, 3]  # positions count real tokens only


# --- clear errors -----------------------------------------------------------------------------------
def test_heads_or_kv_heads_not_divisible_by_p_are_refused():
    check_model(_tiny_llama(4, 2), 2)
    with pytest.raises(SequenceParallelError, match=r"attention heads \(4\).*key/value heads \(1\)"):
        check_model(_tiny_llama(4, 1), 2)
    with pytest.raises(SequenceParallelError, match=r"must divide the attention heads \(4\)"):
        check_model(_tiny_llama(4, 4), 3)


def test_unsupported_family_and_sliding_windows_are_refused(fixture_dir):
    from transformers import AutoModelForCausalLM

    opt = AutoModelForCausalLM.from_pretrained(fixture_dir / "opt")
    with pytest.raises(SequenceParallelError, match="supports the model families llama, qwen2; got 'opt'"):
        check_model(opt, 2)
    qwen = AutoModelForCausalLM.from_pretrained(
        fixture_dir / "qwen2", use_sliding_window=True, sliding_window=4
    )
    with pytest.raises(SequenceParallelError, match="sliding-window"):
        check_model(qwen, 2)


def test_world_size_not_divisible_by_p_and_packing_are_refused():
    with pytest.raises(SequenceParallelError, match="must divide the number of processes"):
        init_sequence_parallel(2, DistInfo(0, 3, 0, torch.device("cpu")))
    with pytest.raises(SequenceParallelError, match="data.packing=true is not supported"):
        reject_packing(True, _layout(0))
    reject_packing(True, _layout(0, size=1))  # packing stays fine without SP
    packed = {"input_ids": torch.ones(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 0, 1]])}
    with pytest.raises(SequenceParallelError, match="packed batch"):
        shard_batch(packed, _layout(0))


def test_full_sequence_attention_restores_the_original_kernel_for_generation():
    model = _tiny_llama()
    original = model.config._attn_implementation
    enable_ulysses(model, _layout(0))
    assert model.config._attn_implementation == "chatforge_ulysses"
    with full_sequence_attention(model):
        assert model.config._attn_implementation == original
    assert model.config._attn_implementation == "chatforge_ulysses"


def test_zero3_loss_factor_compensates_deepspeeds_reduce_scatter_average():
    config = {"zero_optimization": {"stage": 3, "reduce_scatter": False}}
    assert zero3_loss_factor(config, _layout(0)) == 2.0
    assert config["zero_optimization"]["reduce_scatter"] is True  # one averaging path for every bucket
    assert zero3_loss_factor({"zero_optimization": {"stage": 2}}, _layout(0)) == 1.0
    assert zero3_loss_factor({"zero_optimization": {"stage": 3}}, _layout(0, size=1)) == 1.0
