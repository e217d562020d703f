"""SFTTrainer and `chatforge sft` on the arithmetic task with the tiny Llama fixture: the eval curve, the
exported HF dir, resume after a hard kill, ZeRO-2 on 2 processes against 1, NaN handling, the CLI."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from chatforge.trainers.guard import TrainingDiverged

# The same optimizer steps replayed from a checkpoint: bit-identical here; 1e-6 is slack.
RESUME_TOL = 1e-6
# ZeRO-2 on 2 ranks vs 1 rank, same 16 rows per step: gradients are summed in another order (gloo
# all-reduce of two 8-row halves); 2e-6 was seen over 8 steps at lr 3e-3.
ZERO2_TOL = 1e-5

FAST = ("model.learning_rate=3e-3", "optim.warmup=0.05", "batch.micro_batch_size=16")


def test_eval_perplexity_falls_well_below_its_start_and_the_model_dir_loads(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "sft"
    _, final = runs.fit("sft", runs.args("sft", out, *FAST, "train.max_steps=40", "train.eval_every=20"))
    evals = runs.eval_records(out)
    assert [r["step"] for r in evals] == [0, 20, 40]
    start, mid, end = (r["perplexity"] for r in evals)
    assert start > 100  # untrained: close to uniform over the 512-token vocabulary
    assert end < mid < start and end < 4.0, evals  # ~500 -> ~3.1
    assert final["perplexity"] == pytest.approx(end)
    assert (out / "DONE").is_file() and (out / "config.yaml").is_file()

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok.pad_token_id is not None and tok.chat_template
    ids = tok("\n\nHuman: What is 2 + 2?\n\nAssistant:", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.slow
def test_sft_solves_the_task(trained_sft, runs):
    """~99% greedy accuracy on prompts SFT never saw (the step-3 part of the data), perplexity ~1.02."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.data import PromptCollator, load_step_data
    from chatforge.data.pipeline import DataSettings
    from chatforge.fixtures import is_correct

    out, final = trained_sft
    evals = runs.eval_records(out)
    assert evals[0]["perplexity"] > 100 and final["perplexity"] < 1.1, (evals[0], final)

    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    cfg = DataSettings.of(None, datasets=[str(runs.task_data)], max_prompt_length=64)
    prompts = load_step_data(cfg, tok, "ppo").train
    rows = [prompts[i] for i in range(128)]
    batch = PromptCollator(tok)(rows)
    with torch.no_grad():
        gen = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8,
            do_sample=False, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
    questions = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    answers = tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    accuracy = sum(is_correct(q, a) for q, a in zip(questions, answers)) / len(rows)
    assert accuracy >= 0.9, list(zip(questions, answers))[:8]


# --- resume -----------------------------------------------------------------------------------------
def test_resume_after_a_kill_gives_the_uninterrupted_result(runs, tmp_path):
    """Killed right after step 3 (checkpoint at step 2), rerun with --resume: steps 3..6 and the final
    eval equal those of a run that was never interrupted."""
    steps = (*FAST, "train.max_steps=6", "train.save_every=2")
    killed = tmp_path / "killed"
    with pytest.raises(AssertionError, match=r"failed \(17\)"):
        runs.cli("sft", runs.args("sft", killed, *steps), env={"CHATFORGE_FAULT_AT_STEP": "3"})
    assert (killed / "checkpoints" / "model" / "latest").read_text().strip() == "step2"
    assert not (killed / "DONE").exists() and sorted(runs.train_records(killed)) == [1, 2, 3]
    runs.cli("sft", [*runs.args("sft", killed, *steps), "--resume"])

    whole = tmp_path / "whole"
    _, final = runs.fit("sft", runs.args("sft", whole, *steps))
    resumed, reference = runs.train_records(killed), runs.train_records(whole)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        want = {k: v for k, v in reference[step].items() if k not in ("phase", "time")}
        got = {k: resumed[step][k] for k in want}
        assert got == pytest.approx(want, rel=RESUME_TOL), step
    end = runs.eval_records(killed)[-1]
    assert end["step"] == 6
    assert end["loss"] == pytest.approx(final["loss"], rel=RESUME_TOL)
    assert end["perplexity"] == pytest.approx(final["perplexity"], rel=RESUME_TOL)
    assert (killed / "DONE").is_file()


# --- two processes ----------------------------------------------------------------------------------
@pytest.mark.multiproc
def test_zero2_on_two_processes_follows_the_single_process_curve(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = ("model.learning_rate=3e-3", "train.max_steps=8", "train.eval_every=4")
    two = tmp_path / "zero2"
    runs.cli("sft", runs.args("sft", two, *steps, "batch.micro_batch_size=8", "model.zero_stage=2"), nproc=2)
    one = tmp_path / "one"
    _, final = runs.fit("sft", runs.args("sft", one, *steps, "batch.micro_batch_size=16"))

    curve_two, curve_one = runs.train_records(two), runs.train_records(one)
    assert sorted(curve_two) == sorted(curve_one) == list(range(1, 9))
    for step, record in curve_one.items():
        assert curve_two[step]["loss"] == pytest.approx(record["loss"], abs=ZERO2_TOL), step
    assert curve_one[8]["loss"] < curve_one[1]["loss"] - 1.0  # it trains
    evals_two = runs.eval_records(two)
    assert [r["step"] for r in evals_two] == [0, 4, 8]
    assert evals_two[-1]["loss"] == pytest.approx(final["loss"], abs=ZERO2_TOL)
    assert evals_two[-1]["tokens"] == final["tokens"]  # every eval row counted once over the ranks

    model = AutoModelForCausalLM.from_pretrained(two / "model")  # plain transformers, no DeepSpeed
    reference = AutoModelForCausalLM.from_pretrained(one / "model")
    tok = AutoTokenizer.from_pretrained(two / "model")
    ids = tok("\n\nHuman: What is 3 - 1?\n\nAssistant:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-3)


# --- non-finite losses ------------------------------------------------------------------------------
def test_a_few_nan_losses_are_skipped_and_named(runs, tmp_path, caplog):
    out = tmp_path / "sft"
    trainer = runs.trainer("sft", runs.args("sft", out, *FAST, "train.max_steps=6"))
    runs.nan_on_steps(trainer, {3, 4})
    with caplog.at_level(logging.WARNING, logger="chatforge"):
        final = trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(warnings) == 2 and "at step 3 " in warnings[0] and "at step 4 " in warnings[1], warnings
    assert trainer.setup.guard.total == 2 and (out / "DONE").is_file()
    # The skipped batches' NaN activations did not reach the weights (0 * NaN gradients would).
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    assert torch.isfinite(torch.tensor(final["loss"]))
    records = runs.train_records(out)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[6]["loss"] < records[2]["loss"]  # training went on after the skips


def test_too_many_nan_losses_in_a_row_abort_and_keep_the_last_checkpoint(runs, tmp_path):
    out = tmp_path / "sft"
    steps = (*FAST, "train.max_steps=10", "train.save_every=2")
    trainer = runs.trainer("sft", runs.args("sft", out, *steps))
    runs.nan_on_steps(trainer, set(range(5, 100)))
    # Three bad steps in a row are skipped (5, 6, 7); the fourth stops the run.
    with pytest.raises(TrainingDiverged, match=r"4 times in a row \(last at step 8\).*checkpoint is kept"):
        trainer.fit()
    assert not (out / "DONE").exists()
    assert (out / "checkpoints" / "model" / "latest").read_text().strip() == "step6"

    # The data is fine again: the kept checkpoint loads and the run finishes.
    trainer, final = runs.fit("sft", runs.args("sft", out, *steps, "train.resume=true"))
    assert trainer.setup.guard.total == 0 and (out / "DONE").is_file()
    assert sorted(runs.train_records(out)) == list(range(1, 11))
    assert torch.isfinite(torch.tensor(final["loss"])) and final["loss"] < runs.eval_records(out)[0]["loss"]


# --- command line -----------------------------------------------------------------------------------
def chatforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatforge.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_config_lists_every_key_with_its_doc():
    proc = chatforge("sft", "--help-config")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for key in ("model.name_or_path", "model.zero_stage", "model.learning_rate", "batch.epochs"):
        assert key in lines, key
    assert "ZeRO stage" in lines["model.zero_stage"] and "[default: 0]" in lines["model.zero_stage"]
    assert "[default: 0.0001]" in lines["model.learning_rate"]  # SFT's own default, not the class's


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.zero_stage=7", "model.zero_stage must be 0, 1, 2 or 3, got 7"),
        ("train.bogus=1", "unknown config key(s) train.bogus"),
        ("batch.epochs=abc", "batch.epochs: expected an integer"),
        ("batch.epochs=-1", "batch.epochs must be >= 1, got -1"),
        ("model.learning_rate=-1e-4", "model.learning_rate must be > 0"),
    ],
)
def test_a_bad_override_exits_2_naming_the_key(override, message, tmp_path):
    proc = chatforge("sft", "model.name_or_path=x", f"train.output_dir={tmp_path}", override)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was started
