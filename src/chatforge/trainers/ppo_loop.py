"""The standard step-3 loop behind `PPOTrainer.fit()` / `chatforge ppo`: prompts -> experience -> PPO
update, with metrics, evaluation, checkpoints, resume and the final exports (actor, EMA actor, critic)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from chatforge.config import save_yaml
from chatforge.engine import all_reduce_sum
from chatforge.models.value import sequence_scores

from .common import (
    BatchSchedule,
    MetricsLogger,
    Progress,
    RunDir,
    build_splits_or_fail,
    log,
    mark_done,
    maybe_die,
    seed_everything,
)
from .ppo_utils import LoopState, load_ppo_checkpoint, rank_mean, save_ppo_checkpoint


def run_ppo(trainer) -> dict[str, float]:
    from chatforge.data import PromptCollator, load_step_data

    cfg, t, engine = trainer.cfg, trainer.cfg.train, trainer.engine
    dist = engine.dist
    run = RunDir.create(t.output_dir, t.final_model_dir or str(Path(t.output_dir) / "actor"))
    seed_everything(t.seed)
    if dist.is_main:
        save_yaml(cfg, run.config)
    data = load_step_data(cfg.data, trainer.tokenizer, "ppo")
    collate = PromptCollator(trainer.tokenizer)
    schedule = BatchSchedule(len(data.train), t.rollout_batch_size, 1, dist.rank, dist.world_size, t.seed)
    build_splits_or_fail(
        len(data.train), schedule.steps_per_epoch, t.rollout_batch_size * dist.world_size, "PPO prompt"
    )
    metrics = MetricsLogger(run, dist.is_main, t.tensorboard)
    step = _maybe_resume(trainer, run, schedule) if t.resume else 0
    eval_rows = _eval_rows(data, t.eval_prompts, dist.rank, dist.world_size)
    log.info("ppo: %d prompts, %d per iteration, %d iterations", len(data.train),
             t.rollout_batch_size * dist.world_size, t.max_steps)  # fmt: skip
    if step == 0:
        evaluate(trainer, eval_rows, collate, metrics, step)
    bar = Progress(t.max_steps, "ppo", dist.is_main, initial=step)
    windows = schedule.windows()
    while step < t.max_steps:
        (idx,) = next(windows)
        trainer.timings = dict.fromkeys(trainer.timings, 0.0)
        experience = trainer.generate_experience(collate([data.train[j] for j in idx]))
        # Mini-batch order depends on (seed, iteration) only, so a resumed run shuffles like an unbroken one.
        trainer.shuffler.manual_seed(t.seed * 1_000_003 + step)
        stats = rank_mean({**trainer.train_rlhf(experience), **trainer.timings})
        step += 1
        bar.update(1, reward=stats["reward_raw"], kl=stats["kl"])
        if step % t.log_every == 0:
            metrics.log("train", step, {**stats, "lr_actor": engine.actor.lr, "lr_critic": engine.critic.lr})
        if t.eval_every and step % t.eval_every == 0 and step < t.max_steps:
            evaluate(trainer, eval_rows, collate, metrics, step)
        if t.save_every and step % t.save_every == 0 and step < t.max_steps:
            _save(trainer, run, schedule, step)
        maybe_die(step)
    bar.close()
    final = evaluate(trainer, eval_rows, collate, metrics, step)
    _save(trainer, run, schedule, step)
    _export(trainer, run)
    mark_done(run, dist.is_main, step, final)
    metrics.close()
    return final


def _loop_state(trainer, schedule: BatchSchedule, step: int) -> LoopState:
    return LoopState(
        step=step,
        prompt_position=list(schedule.position),
        ptx_position=trainer.ptx.position if trainer.ptx is not None else None,
        kl_coef=trainer.kl_ctl.value,
        sampler_state=trainer.sampler.get_state(),
    )


def _save(trainer, run: RunDir, schedule: BatchSchedule, step: int) -> None:
    state = _loop_state(trainer, schedule, step)
    save_ppo_checkpoint(trainer.engine, run, state, trainer.cfg.train.keep_checkpoints, trainer.ema)


def _maybe_resume(trainer, run: RunDir, schedule: BatchSchedule) -> int:
    state = load_ppo_checkpoint(trainer.engine, run, trainer.ema)
    if state is None:
        log.info("no checkpoint in %s; starting from scratch", run.checkpoints)
        return 0
    schedule.position = tuple(state.prompt_position)
    if trainer.ptx is not None and state.ptx_position is not None:
        trainer.ptx.position = state.ptx_position
    trainer.kl_ctl.value = state.kl_coef
    trainer.sampler.set_state(state.sampler_state)
    log.info("resumed PPO from iteration %d", state.step)
    return state.step


def _export(trainer, run: RunDir) -> None:
    t, engine = trainer.cfg.train, trainer.engine
    engine.actor.save_hf(run.final_model, trainer.tokenizer, lora_save="merged")
    if trainer.ema is not None:
        ema_dir = t.ema_model_dir or str(run.root / "actor-ema")
        trainer.ema.save(engine.actor.gathered, ema_dir, trainer.tokenizer, engine.dist.is_main)
    if t.critic_model_dir:
        engine.critic.save_hf(t.critic_model_dir, trainer.tokenizer)


def _eval_rows(data, n_prompts: int, rank: int, world: int) -> list[dict]:
    """The same number of held-out prompts on every rank (ZeRO-3 forwards are collective)."""
    rows = data.eval if len(data.eval) > 0 else data.train
    n = min(n_prompts, len(rows)) // world * world
    return [rows[i] for i in range(rank, n, world)]


@torch.no_grad()
def evaluate(trainer, rows: list[dict], collate, metrics: MetricsLogger, step: int) -> dict[str, float]:
    """Greedy responses to held-out prompts: mean reward-model score (and task accuracy with a check)."""
    gen = dataclasses.replace(trainer.cfg.generation, do_sample=False)
    engine = trainer.engine
    size = trainer.cfg.train.rollout_batch_size
    sums = torch.zeros(4, dtype=torch.float64)  # rows, score, correct, response tokens
    for i in range(0, len(rows), size):
        batch = collate(rows[i : i + size])
        out = trainer.rollout(batch, gen, torch.Generator().manual_seed(0))
        attention = torch.cat([batch["attention_mask"].to(out.response_mask.device), out.response_mask], 1)
        scores = sequence_scores(engine.reward.module, out.sequences, attention, forward=engine.reward)
        correct = _count_correct(trainer, batch, out) if trainer.task_check else 0
        sums += torch.tensor([len(scores), float(scores.sum()), correct, float(out.response_mask.sum())])
    sums = all_reduce_sum(sums)
    n = max(sums[0].item(), 1.0)
    result = {"reward_raw": sums[1].item() / n, "response_length": sums[3].item() / n}
    if trainer.task_check:
        result["task_accuracy"] = sums[2].item() / n
    metrics.log("eval", step, result)
    return result


def _count_correct(trainer, batch: dict, out) -> int:
    tok, prompt_len = trainer.tokenizer, batch["input_ids"].shape[1]
    correct = 0
    for row in range(out.sequences.shape[0]):
        prompt = tok.decode(
            batch["input_ids"][row][batch["attention_mask"][row].bool()], skip_special_tokens=True
        )
        response_ids = out.sequences[row, prompt_len:][out.response_mask[row].bool()]
        correct += bool(trainer.task_check(prompt, tok.decode(response_ids, skip_special_tokens=True)))
    return correct
