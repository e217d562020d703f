"""What the offline steps (1: SFT, 2: reward model, DPO) share around their own math: the set-up, the
loop and the finish. Each trainer keeps `_train_step(window) -> stats` and `evaluate()`; these functions
do the rest (process layout, data, schedule, resume, logging, periodic evals and checkpoints, export).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge.config import save_yaml, to_dict

from .checkpoint import load_checkpoint, maybe_die, naming_a_full_disk, save_checkpoint, seed_everything
from .guard import NonFiniteGuard
from .run_dir import MetricsLogger, Progress, RunDir, check_run_dir, log
from .schedule import BatchSchedule


@dataclass
class OfflineSetup:
    """What an offline step builds before its engines: process layout, run dir, data, schedule, logging."""

    dist: object
    sp: object
    dp: object
    run: RunDir
    tokenizer: object
    data: object
    collate: object
    schedule: BatchSchedule
    total_steps: int
    metrics: MetricsLogger
    guard: NonFiniteGuard


def setup_offline(config, step: str, data_step: str, collate_cls) -> OfflineSetup:
    """Distributed set-up, run dir, the data of `data_step` and the deterministic schedule.

    `config` has model-like sections, `engine`, `data`, `batch` and `train`; its first trained model's
    path gives the tokenizer."""
    from chatforge.data import load_step_data
    from chatforge.engine import init_distributed
    from chatforge.engine.sequence_parallel import init_sequence_parallel, reject_packing
    from chatforge.models.loading import check_model_source, load_tokenizer

    config.validate()
    t, b = config.train, config.batch
    # Everything that can be wrong with the inputs fails here, before the run dir is touched.
    check_run_dir(Path(t.output_dir), step, t.resume)
    model = getattr(config, "model", None) or config.policy
    tokenizer = load_tokenizer(model.name_or_path, config.engine.trust_remote_code)
    ref = getattr(config, "ref", None)
    if ref is not None and ref.name_or_path != model.name_or_path:
        check_model_source(ref.name_or_path, config.engine.trust_remote_code)
    data = load_step_data(config.data, tokenizer, data_step)
    dist = init_distributed()
    # Ranks of one sequence-parallel group share each row, so rows are dealt over data-parallel ranks.
    sp = init_sequence_parallel(config.engine.sequence_parallel_size, dist)
    reject_packing(getattr(config.data, "packing", False), sp)
    dp = sp.data_parallel(dist)
    schedule = BatchSchedule(
        len(data.train), b.micro_batch_size, b.gradient_accumulation_steps, dp.rank, dp.world_size, t.seed
    )
    schedule.require_one_step(step)
    run = RunDir.create(t.output_dir, t.final_model_dir)
    run.claim(step, dist.is_main, t.resume)
    seed_everything(t.seed)
    if dist.is_main:
        save_yaml(config, run.config)
    metrics = MetricsLogger(run, dist.is_main, t.report_to, to_dict(config))
    return OfflineSetup(
        dist, sp, dp, run, tokenizer, data, collate_cls(tokenizer), schedule,
        schedule.total_steps(b.epochs, t.max_steps), metrics, NonFiniteGuard(),
    )  # fmt: skip


def run_offline_loop(trainer, name: str, unit: str) -> None:
    """Resume, an eval at step 0, then optimizer steps with logging, periodic evals and checkpoints.
    The trainer provides `engines` (the trained one first), `_train_step(window) -> stats` and
    `evaluate()`; the final eval and export are its own (see `finish_offline`)."""
    t, s = trainer.cfg.train, trainer.setup
    state = load_checkpoint(s.run, trainer.engines) if t.resume else None
    if state is not None:
        s.schedule.position = tuple(state["position"])
    trainer.step = state["step"] if state else 0
    global_batch = s.schedule.micro * s.schedule.accumulation * s.schedule.world
    log.info(
        "%s: %d %s, global batch %d, %d steps", name, len(s.data.train), unit, global_batch, s.total_steps
    )
    if trainer.step == 0:
        trainer.evaluate()  # the starting point of the eval curve
    bar = Progress(s.total_steps, name, s.dist.is_main, initial=trainer.step)
    main = next(iter(trainer.engines.values()))
    for window in s.schedule.windows():
        if trainer.step >= s.total_steps:
            break
        stats = trainer._train_step([s.collate([s.data.train[j] for j in idx]) for idx in window])
        trainer.step += 1
        bar.update(1, **stats)
        s.metrics.log("train", trainer.step, {**stats, "lr": main.lr, "grad_norm": main.grad_norm})
        if t.eval_every and trainer.step % t.eval_every == 0 and trainer.step < s.total_steps:
            trainer.evaluate()
        if t.save_every and trainer.step % t.save_every == 0 and trainer.step < s.total_steps:
            _save(trainer)
        maybe_die(trainer.step)
    bar.close()


def _save(trainer) -> None:
    shared = {"step": trainer.step, "position": list(trainer.setup.schedule.position)}
    save_checkpoint(trainer.setup.run, trainer.engines, f"step{trainer.step}", shared)


def finish_offline(trainer, final: dict, before_done=None) -> None:
    """Final checkpoint, the plain HF model (atomic), `before_done()` (extra files), then the DONE marker."""
    s = trainer.setup
    _save(trainer)
    name, engine = next(iter(trainer.engines.items()))
    with naming_a_full_disk(s.run, f"the model {s.run.final_model}", name):
        engine.save_hf(s.run.final_model, s.tokenizer, adapter=False)
        if before_done is not None:
            before_done()
    s.run.mark_done(s.dist.is_main, trainer.step, final)
    s.metrics.close()
