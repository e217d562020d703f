"""What steps 1 (SFT) and 2 (reward) share around their own math: the set-up and the loop.

Each trainer keeps its `_train_step(window) -> stats` and `evaluate()`; these functions do the rest
(process layout, data, schedule, engine, resume, logging, periodic evals and checkpoints, the export).
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import (
    BatchSchedule,
    MetricsLogger,
    NonFiniteGuard,
    Progress,
    RunDir,
    build_splits_or_fail,
    load_train_checkpoint,
    log,
    mark_done,
    maybe_die,
    save_train_checkpoint,
    seed_everything,
)


@dataclass
class StepSetup:
    """What steps 1 and 2 build before their loop: process layout, data, schedule, engine, logging."""

    dist: object
    sp: object
    dp: object
    run: RunDir
    tokenizer: object
    data: object
    collate: object
    schedule: BatchSchedule
    global_batch_size: int
    total_steps: int
    engine: object
    metrics: MetricsLogger
    guard: NonFiniteGuard


def setup_step(
    config, step: str, collate_cls, model_loader, trainable_heads: tuple[str, ...] = ()
) -> StepSetup:
    """Distributed set-up, run dir, data of `step`, the deterministic schedule and the engine.

    `model_loader(model_cfg, dtype, pad_token_id)` builds the HF model (inside ZeRO-3 init when needed)."""
    from chatforge.config import save_yaml
    from chatforge.data import load_step_data
    from chatforge.engine import TrainEngine, init_distributed
    from chatforge.engine.sequence_parallel import init_sequence_parallel, reject_packing
    from chatforge.models.loading import load_tokenizer

    config.validate()
    t = config.train
    dist = init_distributed()
    # Ranks of one sequence-parallel group share each row, so rows are dealt over data-parallel ranks.
    sp = init_sequence_parallel(config.engine.sequence_parallel_size, dist)
    reject_packing(config.data.packing, sp)
    dp = sp.data_parallel(dist)
    run = RunDir.create(t.output_dir, t.final_model_dir)
    seed_everything(t.seed)
    if dist.is_main:
        save_yaml(config, run.config)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    data = load_step_data(config.data, tokenizer, step)
    schedule = BatchSchedule(
        len(data.train), t.micro_batch_size, t.gradient_accumulation_steps, dp.rank, dp.world_size, t.seed
    )
    global_batch = t.micro_batch_size * t.gradient_accumulation_steps * dp.world_size
    build_splits_or_fail(len(data.train), schedule.steps_per_epoch, global_batch, step)
    total_steps = schedule.total_steps(t.epochs, t.max_steps)
    engine = TrainEngine(
        lambda dtype: model_loader(config.model, dtype, tokenizer.pad_token_id),
        config.engine,
        config.optim,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        total_steps=total_steps,
        trainable_heads=trainable_heads,
        dist=dist,
    )
    metrics = MetricsLogger(run, dist.is_main, t.tensorboard)
    return StepSetup(
        dist, sp, dp, run, tokenizer, data, collate_cls(tokenizer), schedule, global_batch, total_steps,
        engine, metrics, NonFiniteGuard(t.max_bad_steps),
    )  # fmt: skip


def run_step_loop(trainer, name: str, unit: str) -> None:
    """The loop steps 1 and 2 share: resume, an eval at step 0, then optimizer steps with logging,
    periodic evals and checkpoints. The trainer provides `_train_step(window) -> stats` (with `loss`)
    and `evaluate()`; the final eval and export are its own (see `finish_step`)."""
    t = trainer.cfg.train
    state = load_train_checkpoint(trainer.engine, trainer.run, trainer.schedule) if t.resume else None
    trainer.step = state["step"] if state else 0
    log.info(
        "%s: %d %s, global batch %d, %d steps",
        name, len(trainer.data.train), unit, trainer.global_batch_size, trainer.total_steps,
    )  # fmt: skip
    if trainer.step == 0:
        trainer.evaluate()  # the starting point of the eval curve
    bar = Progress(trainer.total_steps, name, trainer.dist.is_main, initial=trainer.step)
    for window in trainer.schedule.windows():
        if trainer.step >= trainer.total_steps:
            break
        stats = trainer._train_step([trainer.collate([trainer.data.train[j] for j in idx]) for idx in window])
        trainer.step += 1
        bar.update(1, **stats)
        if trainer.step % t.log_every == 0:
            engine = trainer.engine
            trainer.metrics.log(
                "train", trainer.step, {**stats, "lr": engine.lr, "grad_norm": engine.grad_norm}
            )
        if t.eval_every and trainer.step % t.eval_every == 0 and trainer.step < trainer.total_steps:
            trainer.evaluate()
        if t.save_every and trainer.step % t.save_every == 0 and trainer.step < trainer.total_steps:
            save_train_checkpoint(
                trainer.engine, trainer.run, trainer.step, trainer.schedule, t.keep_checkpoints
            )
        maybe_die(trainer.step)
    bar.close()


def finish_step(trainer, final: dict, before_done=None) -> None:
    """Final checkpoint, the plain HF model (atomic), `before_done()` (extra files), then the DONE marker."""
    t = trainer.cfg.train
    save_train_checkpoint(trainer.engine, trainer.run, trainer.step, trainer.schedule, t.keep_checkpoints)
    trainer.engine.save_hf(trainer.run.final_model, trainer.tokenizer)
    if before_done is not None:
        before_done()
    mark_done(trainer.run, trainer.dist.is_main, trainer.step, final)
    trainer.metrics.close()
