"""Step 3's trainer on fixture models in one process: the invariants of the first update, read from the
trainer's own stats; every estimator (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++) with reward models, rule
rewards or both; the loop's outputs (metrics, samples, exports, EMA, PTX); the guards (non-finite losses,
the KL budget, the best checkpoint by a gold signal)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from chatforge.config import PPOConfig, from_dict
from chatforge.trainers.run_dir import read_metrics

TRAIN_METRICS = (
    "reward", "kl", "kl_coef", "entropy", "response_length", "clip_frac", "policy_loss", "ptx_loss",
    "logprob_mismatch", "time_generation", "time_scoring", "time_training", "ratio_first", "clip_frac_first",
)  # fmt: skip
TASK_CHECK = "chatforge.fixtures.task:is_correct"


def make_config(
    actor_dir: Path, reward_dir: Path | None, task_files: dict, out: Path, **sections
) -> PPOConfig:
    """A small step-3 config; `sections` replace or extend whole sections (`name={...}`)."""
    base = {
        "actor": {"name_or_path": str(actor_dir), "learning_rate": 1e-5},
        "reward": {"models": [str(reward_dir)] if reward_dir else []},
        "engine": {"precision": "fp32"},
        "data": {"datasets": [task_files["prompts"]], "data_split": [0, 0, 1]},
        "rollout": {"batch_size": 4, "max_new_tokens": 8},
        "algorithm": {"num_minibatches": 2, "epochs": 2},
        "eval": {"prompts": 4, "samples": 2},
        "train": {"output_dir": str(out), "max_steps": 2, "eval_every": 0, "report_to": ["none"]},
    }  # fmt: skip
    for name, value in sections.items():
        base[name] = {**base.get(name, {}), **value}
    return from_dict(PPOConfig, base)


def trainer_for(cfg: PPOConfig):
    from chatforge.trainers.ppo import PPOTrainer, RLHFEngine

    return PPOTrainer(RLHFEngine(cfg), cfg)


def prompt_batch(trainer, n: int = 4) -> dict:
    from chatforge.data import PromptCollator, load_step_data

    data = load_step_data(trainer.cfg.data, trainer.tokenizer, "ppo")
    return PromptCollator(trainer.tokenizer)([data.train[i] for i in range(n)])


@pytest.mark.parametrize("lora", [0, 4])
def test_first_minibatch_ratio_is_one_and_kl_is_zero(fixture_dir, task_files, tmp_path, lora):
    """Actor == reference at the start: KL is 0; old log-probs come from the training forward: ratio 1."""
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path, actor={"lora_r": lora}
    )
    trainer = trainer_for(cfg)
    assert trainer.engine.shares_reference == bool(lora)
    exp = trainer.generate_experience(prompt_batch(trainer))
    assert exp.response_mask.sum() > 0
    torch.testing.assert_close(exp.ref_logprobs, exp.logprobs, rtol=0, atol=0)
    stats = trainer.train_rlhf(exp)
    assert stats["kl"] == 0.0
    assert stats["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac_first"] == 0.0
    # Sampler and training forward agree up to kernel differences (cached vs full-sequence attention).
    assert stats["logprob_mismatch"] < 1e-4
    # After 4 actor steps the policy moved, so a second rollout has KL > 0 against the reference.
    exp2 = trainer.generate_experience(prompt_batch(trainer))
    assert (exp2.logprobs - exp2.ref_logprobs).abs().max() > 0


def test_rewards_at_last_token_and_masked_after_eos(fixture_dir, task_files, tmp_path):
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path,
        algorithm={"kl_coef": 0.0, "kl_target": None, "kl_limit": None}, reward={"clip": 0.0},
    )  # fmt: skip
    trainer = trainer_for(cfg)
    exp = trainer.generate_experience(prompt_batch(trainer))
    last = exp.response_mask.sum(1) - 1
    for row in range(exp.size):
        nonzero = exp.rewards[row].nonzero().flatten().tolist()
        assert nonzero in ([int(last[row])], [])
        assert exp.rewards[row, int(last[row])] == pytest.approx(float(exp.scores[row]))
    assert (exp.advantages[exp.response_mask == 0] == 0).all()
    assert (exp.returns[exp.response_mask == 0] == 0).all()


def test_train_rlhf_reports_the_statistics_of_the_experience_it_is_given(fixture_dir, task_files, tmp_path):
    cfg = make_config(fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path)
    trainer = trainer_for(cfg)
    first = trainer.generate_experience(prompt_batch(trainer))
    trainer.generate_experience(prompt_batch(trainer, 2))  # a later rollout must not leak into the stats
    stats = trainer.train_rlhf(first)
    for key, value in first.stats.items():
        assert stats[key] == value, key


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "reinforce++"])
def test_critic_free_estimators_build_no_critic_and_train(fixture_dir, task_files, tmp_path, algorithm):
    n = 1 if algorithm == "reinforce++" else 4
    cfg = make_config(
        fixture_dir / "llama", None, task_files, tmp_path, algorithm={"name": algorithm},
        reward={"functions": [TASK_CHECK, "chatforge.fixtures.task:length_penalty*0.1"]},
        rollout={"n_samples_per_prompt": n, "batch_size": 2 if n > 1 else 4},
    )  # fmt: skip
    trainer = trainer_for(cfg)
    assert trainer.engine.critic is None and not trainer.engine.reward_models
    batch = prompt_batch(trainer, 2 if n > 1 else 4)
    exp = trainer.generate_experience(batch)
    assert exp.size == (2 * n if n > 1 else 4) and exp.values is None and exp.returns is None
    if n > 1:  # responses 0-3 answer prompt 0: one group; advantages are per response, 0 past the end
        prompts = exp.sequences[:, : exp.prompt_len]
        assert torch.equal(prompts[0], prompts[3]) and not torch.equal(prompts[0], batch["input_ids"][1])
        per_response = exp.advantages.sum(1) / exp.response_mask.sum(1).clamp(min=1)
        torch.testing.assert_close(exp.advantages, per_response[:, None] * exp.response_mask)
    stats = trainer.train_rlhf(exp)
    assert "value_loss" not in stats and stats["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert "reward_fn:chatforge.fixtures.task:is_correct" in stats


def test_a_bad_reward_function_is_named(fixture_dir, task_files, tmp_path):
    from chatforge.rewards import RewardFunctionError

    cfg = make_config(
        fixture_dir / "llama",
        None,
        task_files,
        tmp_path,
        reward={"functions": ["tests.trainers.bad_rewards:nan_score"]},
    )
    trainer = trainer_for(cfg)
    with pytest.raises(
        RewardFunctionError, match=r"tests.trainers.bad_rewards:nan_score returned nan for response 0"
    ):
        trainer.generate_experience(prompt_batch(trainer))
    cfg.reward.functions = ["tests.trainers.bad_rewards:too_few"]
    with pytest.raises(RewardFunctionError, match="returned 1 scores for 4 responses"):
        trainer_for(cfg).generate_experience(prompt_batch(trainer))


def test_fit_logs_metrics_samples_and_exports_actor_ema_critic(fixture_dir, task_files, tmp_path):
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path / "run",
        ema={"decay": 0.5}, ptx={"coef": 0.5, "datasets": [task_files["text"]]},
        eval={"gold": [TASK_CHECK]}, train={"save_every": 1},
    )  # fmt: skip
    final = trainer_for(cfg).fit()
    assert f"gold:{TASK_CHECK}_greedy" in final and "distinct_2_sampled" in final
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for name in TRAIN_METRICS:
        assert all(name in r for r in train), name
    assert all(r["ptx_loss"] > 0 for r in train)
    evals = [r for r in records if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2] and "reward_gain_per_kl" in evals[-1]
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 2} and all("response" in s and "prompt" in s for s in samples)
    for sub in ("actor", "actor-ema", "critic"):
        assert (tmp_path / "run" / sub / "model.safetensors").is_file(), sub
    assert (tmp_path / "run" / "DONE").is_file()


def test_a_nan_actor_loss_is_skipped_and_named(fixture_dir, task_files, tmp_path, caplog):
    cfg = make_config(fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path)
    trainer = trainer_for(cfg)
    calls = [0]

    def poison(module, inputs, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            return output * float("nan") if calls[0] == 1 else output
        return output

    trainer.engine.actor.module.model.norm.register_forward_hook(poison)
    exp = trainer.generate_experience(prompt_batch(trainer))
    with caplog.at_level(logging.WARNING, logger="chatforge"):
        trainer.train_rlhf(exp)
    assert any("non-finite actor loss" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(p).all() for p in trainer.engine.actor.module.parameters())


def test_the_kl_limit_stops_the_run_and_restores_the_last_checkpoint(fixture_dir, task_files, tmp_path):
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path / "run",
        actor={"learning_rate": 5e-2}, algorithm={"kl_target": 1e-4, "kl_limit": 2e-4},
        train={"max_steps": 6, "eval_every": 2},
    )  # fmt: skip
    trainer = trainer_for(cfg)
    trainer.fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    stop = [r for r in records if r["phase"] == "guard"]
    assert stop and stop[0]["kl_limit_stop"] == 1.0 and stop[0]["kl"] > 2e-4
    train = [r for r in records if r["phase"] == "train"]
    assert train[-1]["step"] == stop[0]["step"] < 6  # stopped early
    # PTX off, KL in the reward (ppo): those loss terms are not logged as flat zeros.
    assert not any("ptx_loss" in r or "kl_loss" in r for r in train)
    # The exported actor is the last checkpoint within budget (an evaluation step), not the last iteration.
    done = json.loads((tmp_path / "run" / "DONE").read_text())
    assert done["step"] % 2 == 0 and done["step"] < stop[0]["step"]


@pytest.mark.parametrize("kl_mean, kl_median, stops", [(40.0, 0.1, False), (4.0, 4.0, True)])
def test_the_kl_limit_judges_the_typical_response_not_a_few_outliers(
    fixture_dir, task_files, tmp_path, monkeypatch, kl_mean, kl_median, stops
):
    """A healthy rule-reward run had batches whose mean KL passed 3 nats from 1-2 responses at 20-60 nats
    (median 0.3); a policy that moved as a whole shifts the median too."""
    from chatforge.trainers import ppo

    original = ppo.PPOTrainer._score

    def score(self, prompts, out):
        exp = original(self, prompts, out)
        exp.stats.update(kl=kl_mean, kl_median=kl_median)
        return exp

    monkeypatch.setattr(ppo.PPOTrainer, "_score", score)
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path / "run",
        algorithm={"kl_target": 1.0, "kl_limit": 3.0}, train={"max_steps": 3, "eval_every": 0},
    )  # fmt: skip
    trainer_for(cfg).fit()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    guard = [r for r in records if r["phase"] == "guard" and "kl_limit_stop" in r]
    assert bool(guard) == stops
    if stops:
        assert guard[0]["step"] == 1 and guard[0]["kl"] == pytest.approx(kl_median)


def run_with_scripted_evaluations(paths, monkeypatch, script: dict[str, list[float]], **sections) -> Path:
    """fit() for 6 iterations, evaluating at 0, 2, 4 and 6 (the final one), with the sampled responses'
    figures named in `script` replaced by its values, one per evaluation, before the guard sees them; a
    scripted score's standard error is 0 unless scripted too."""
    from chatforge.trainers import ppo

    fixture_dir, task_files, out = paths
    original, calls = ppo.PPOTrainer._eval_summary, iter(range(4))

    def eval_summary(self, kind, batches):
        result = original(self, kind, batches)
        if kind == "sampled":
            i = next(calls)
            result.update({f"stderr_{k}": 0.0 for k in script if f"stderr_{k}" in result})
            result.update({key: values[i] for key, values in script.items()})
        return result

    monkeypatch.setattr(ppo.PPOTrainer, "_eval_summary", eval_summary)
    cfg = make_config(
        fixture_dir / "llama", fixture_dir / "reward-llama", task_files, out, actor={"learning_rate": 1e-3},
        train={"max_steps": 6, "eval_every": 2}, **sections,
    )  # fmt: skip
    trainer_for(cfg).fit()
    return out


def exported_differs_from_last(run: Path) -> bool:
    from safetensors.torch import load_file

    final = load_file(run / "actor" / "model.safetensors")
    last = load_file(run / "actor-last" / "model.safetensors")
    return any(not torch.equal(final[k], last[k]) for k in final)


def test_the_best_checkpoint_by_the_gold_signal_is_exported(fixture_dir, task_files, tmp_path, monkeypatch):
    """With a gold signal the final model is the evaluation that scored best; the last stays as actor-last."""
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {f"gold:{TASK_CHECK}_sampled": [0.1, 0.9, 0.2, 0.3]}, eval={"gold": [TASK_CHECK]},
    )  # fmt: skip
    assert exported_differs_from_last(run)
    assert (run / "checkpoints" / "actor" / "step2").is_dir()  # the best tag survives pruning
    guard = [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "guard"]
    assert [r["exported_step"] for r in guard] == [2.0]


def test_the_final_evaluation_competes_too(fixture_dir, task_files, tmp_path, monkeypatch):
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {f"gold:{TASK_CHECK}_sampled": [0.1, 0.2, 0.3, 0.9]}, eval={"gold": [TASK_CHECK]},
    )  # fmt: skip
    assert not (run / "actor-last").exists()  # the last actor is the best: exported as actor
    assert not [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "guard"]


def test_without_gold_the_best_reward_before_the_drift_is_exported(
    fixture_dir, task_files, tmp_path, monkeypatch
):
    """No gold signal: the highest held-out reward among the evaluations whose median sampled response the
    SFT model finds at most half the KL target (0.5 nats) less likely than its own; later, higher rewards
    came with more drift."""
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {"reward_sampled": [0.0, 0.5, 0.9, 1.2], "ref_nll_median_sampled": [10.0, 9.8, 10.6, 11.0]},
        algorithm={"kl_target": 1.0},
    )  # fmt: skip
    assert exported_differs_from_last(run)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["exported_step"] for r in records if r["phase"] == "guard"] == [2.0]
    evals = [r for r in records if r["phase"] == "eval"]
    assert [r["ref_drift"] for r in evals[1:]] == pytest.approx([-0.2, 0.6, 1.0])
    assert all(r["warnings"] >= 1 for r in evals[2:])  # the reward rose with the drift past 0.5


def test_a_larger_kl_target_allows_more_drift(fixture_dir, task_files, tmp_path, monkeypatch):
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {"reward_sampled": [0.0, 0.5, 0.9, 1.2], "ref_nll_median_sampled": [10.0, 9.8, 10.6, 11.0]},
        algorithm={"kl_target": 2.0},
    )  # fmt: skip
    assert not (run / "actor-last").exists()  # drift 1.0 <= 1.0: the last, best-rewarded actor is exported


def test_with_rule_rewards_only_the_best_held_out_reward_is_exported_whatever_the_drift(
    fixture_dir, task_files, tmp_path, monkeypatch
):
    """A rule reward is a check: RL on it may rightly say what the SFT model would not."""
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {"reward_sampled": [0.1, 0.5, 0.9, 0.6], "ref_nll_median_sampled": [10.0, 12.0, 13.0, 14.0]},
        reward={"models": [], "functions": [TASK_CHECK]}, algorithm={"name": "rloo", "kl_target": 1.0},
        rollout={"n_samples_per_prompt": 2},
    )  # fmt: skip
    records = read_metrics(run / "metrics.jsonl")
    assert [r["exported_step"] for r in records if r["phase"] == "guard"] == [4.0]
    assert all(r["warnings"] == 0 for r in records if r["phase"] == "eval" and "warnings" in r)


def test_a_later_evaluation_within_one_standard_error_of_the_best_is_exported(
    fixture_dir, task_files, tmp_path, monkeypatch
):
    """Step 0 scored 0.55 by luck; the trained policy's 0.50 is within the noise (SE of the difference
    0.057): it is exported, not the SFT model. 0.40 and 0.45 were told apart from 0.55."""
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {"reward_sampled": [0.55, 0.40, 0.45, 0.50], "stderr_reward_sampled": [0.04] * 4},
        reward={"models": [], "functions": [TASK_CHECK]}, algorithm={"name": "rloo"},
        rollout={"n_samples_per_prompt": 2},
    )  # fmt: skip
    assert not (run / "actor-last").exists()
    assert not [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "guard"]


def test_without_a_kl_target_the_last_actor_is_exported_and_the_log_says_it_is_unguarded(
    fixture_dir, task_files, tmp_path, monkeypatch, caplog
):
    run = run_with_scripted_evaluations(
        (fixture_dir, task_files, tmp_path / "run"), monkeypatch,
        {"reward_sampled": [0.0, 0.5, 0.9, 0.2], "ref_nll_median_sampled": [10.0, 9.8, 10.6, 11.0]},
        algorithm={"kl_target": None},
    )  # fmt: skip
    assert not (run / "actor-last").exists()
    assert "nothing guards the export" in caplog.text


def test_the_missing_eos_penalty_is_a_rule_reward(fixture_dir, task_files, tmp_path):
    """`chatforge.rewards.rules:unfinished*-2` subtracts 2 from every response that hit the length limit."""
    cfg = make_config(
        fixture_dir / "llama", None, task_files, tmp_path,
        reward={"functions": ["chatforge.rewards.rules:unfinished*-2.0"], "clip": 0.0}, rollout={"max_new_tokens": 3},
    )  # fmt: skip
    trainer = trainer_for(cfg)
    exp = trainer.generate_experience(prompt_batch(trainer))
    unfinished = exp.response_mask.sum(1) == 3  # a fresh model rarely stops within 3 tokens
    assert unfinished.any()
    torch.testing.assert_close(exp.scores, torch.where(unfinished, -2.0, 0.0), rtol=0, atol=0)


def test_rollouts_come_from_the_generation_backend(fixture_dir, task_files, tmp_path):
    """The trainer samples through `GenerationBackend` (native by default; vLLM on GPUs): a scripted backend's
    responses are what gets scored and trained on."""
    from chatforge.generation import GenerationOutput
    from chatforge.generation.backends import GenerationBackend

    class Scripted(GenerationBackend):
        def generate(self, input_ids, attention_mask, config, generator=None):
            responses = torch.tensor([[11, 12, 13]] * input_ids.shape[0])
            return GenerationOutput(
                torch.cat([input_ids, responses], 1), torch.ones_like(responses), torch.zeros(responses.shape),
                torch.zeros(input_ids.shape[0], dtype=torch.bool),
            )  # fmt: skip

        def load_weights(self, named_tensors):
            raise AssertionError("the native path needs no weight sync")

    cfg = make_config(fixture_dir / "llama", fixture_dir / "reward-llama", task_files, tmp_path)
    trainer = trainer_for(cfg)
    trainer.backend = Scripted()
    exp = trainer.generate_experience(prompt_batch(trainer))
    assert exp.sequences[:, exp.prompt_len :].tolist() == [[11, 12, 13]] * 4
    assert trainer.train_rlhf(exp)["ratio_first"] == pytest.approx(1.0, abs=1e-6)
