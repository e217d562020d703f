"""Step 3 on a GPU (run wherever CUDA exists, skipped elsewhere): a PPO iteration in bf16, generation under
ZeRO-3 with the sampler's generator on the GPU, and the first update's invariants there."""

from __future__ import annotations

import pytest
import torch

from tests.trainers.test_ppo import make_config, prompt_batch, trainer_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)"),
]


def test_a_bf16_ppo_iteration_on_the_gpu_keeps_its_invariants(fixture_dir, task_files, tmp_path):
    cfg = make_config(
        fixture_dir / "llama",
        fixture_dir / "reward-llama",
        task_files,
        tmp_path,
        engine={"precision": "bf16"},
    )
    trainer = trainer_for(cfg)
    assert trainer.sampler.device.type == "cuda"  # torch.multinomial / rand refuse a CPU generator there
    assert next(trainer.engine.actor.module.parameters()).dtype == torch.bfloat16
    exp = trainer.generate_experience(prompt_batch(trainer))
    assert exp.logprobs.dtype == torch.float32 and exp.response_mask.sum() > 0
    stats = trainer.train_rlhf(exp)
    assert stats["kl"] == 0.0 and stats["ratio_first"] == pytest.approx(1.0, abs=1e-3)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_generation_under_zero3_equals_the_exported_model_on_the_gpu(fixture_dir, task_files, tmp_path):
    from transformers import AutoModelForCausalLM

    from chatforge.config.schema import GenerationConfig
    from chatforge.generation import generate

    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path,
        actor={"zero_stage": 3}, engine={"precision": "fp32"},
    )  # fmt: skip
    trainer = trainer_for(cfg)
    batch = prompt_batch(trainer)
    greedy = GenerationConfig(max_new_tokens=8, do_sample=False)
    ours = trainer.rollout(batch, greedy)
    trainer.engine.actor.save_hf(tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").cuda().eval()
    want = generate(
        plain, batch["input_ids"].cuda(), batch["attention_mask"].cuda(), greedy,
        eos_token_id=trainer.stop_ids, pad_token_id=trainer.tokenizer.pad_token_id,
    )  # fmt: skip
    assert torch.equal(ours.sequences, want.sequences)
    sampled = trainer.rollout(batch, trainer._rollout_config(), torch.Generator("cuda").manual_seed(0))
    again = trainer.rollout(batch, trainer._rollout_config(), torch.Generator("cuda").manual_seed(0))
    assert torch.equal(sampled.sequences, again.sequences)  # seeded sampling on the GPU is reproducible
