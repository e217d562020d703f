"""Run by tests/test_deprecations.py in a fresh process: short `chatforge sft` (LoRA, activation
checkpointing), `chatforge reward` and `chatforge ppo` (LoRA actor, EMA, gold signal) runs and ChatModel
replies (plain, batched, streamed), with every warning shown and recorded with the stack that raised it,
and every deprecation a library logs. Writes the records as JSON.

    python tests/warnings_probe.py FIXTURE_DIR TASK_JSONL OUT_DIR RECORDS_JSON
"""

import warnings

warnings.simplefilter("always")  # before any import, so import-time warnings are seen too

import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

DEPRECATION_TEXT = re.compile(r"deprecat|will be removed|no longer supported|is obsolete", re.I)
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
SENTINEL = "chatforge probe sentinel is deprecated"  # proves the hooks see warnings and logged deprecations
RECORDS: list[dict] = []


def _stack() -> list[list]:
    """(file, function) of every frame of the current thread, outermost first, without the probe's hooks."""
    return [[f.filename, f.name] for f in traceback.extract_stack()[:-2]]


def record_warning(message, category, filename, lineno, file=None, line=None) -> None:
    RECORDS.append({
        "source": "warnings", "category": category.__name__, "deprecation": issubclass(category, DEPRECATIONS),
        "message": str(message), "filename": filename, "lineno": lineno, "stack": _stack(),
        "sentinel": str(message) == SENTINEL,
    })  # fmt: skip


_handle = logging.Logger.handle


def handle_and_record(self, rec: logging.LogRecord) -> None:
    """Logger.handle, also for loggers that do not propagate (transformers, DeepSpeed): a deprecation
    logged at WARNING or above is recorded like a warning."""
    if rec.levelno >= logging.WARNING and DEPRECATION_TEXT.search(rec.getMessage()):
        RECORDS.append({
            "source": "logging", "category": f"log:{rec.name}", "deprecation": True, "message": rec.getMessage(),
            "filename": rec.pathname, "lineno": rec.lineno, "stack": _stack(),
            "sentinel": rec.getMessage() == SENTINEL,
        })  # fmt: skip
    _handle(self, rec)


def sentinels() -> None:
    warnings.warn(SENTINEL, DeprecationWarning, stacklevel=1)
    logging.getLogger("transformers").warning(SENTINEL)


def train(fixture_dir: Path, task: Path, out: Path) -> None:
    from chatforge.cli import main as chatforge

    common = [f"data.datasets={task}", "engine.precision=fp32", "train.report_to=[none]", "train.max_steps=2"]
    lengths = ["data.max_prompt_length=64", "data.max_length=96", "batch.micro_batch_size=8"]
    sft = [
        f"model.name_or_path={fixture_dir / 'llama'}", f"train.output_dir={out / 'sft'}", "train.eval_every=1",
        "model.lora_r=4", "engine.gradient_checkpointing=true", *lengths,
    ]  # fmt: skip
    assert chatforge(["--debug", "sft", *common, *sft]) == 0
    reward = [f"model.name_or_path={out / 'sft' / 'model'}", f"train.output_dir={out / 'reward'}", *lengths]
    assert chatforge(["--debug", "reward", *common, *reward]) == 0
    ppo = [
        f"actor.name_or_path={out / 'sft' / 'model'}", f"reward.models=[{out / 'reward' / 'model'}]",
        f"train.output_dir={out / 'ppo'}", "train.eval_every=1", "rollout.batch_size=4",
        "rollout.max_new_tokens=8", "algorithm.num_minibatches=2", "eval.prompts=4", "eval.samples=2",
        "eval.gold=[chatforge.fixtures.task:is_correct]", "data.max_prompt_length=64", "ema.decay=0.9",
        "actor.lora_r=4",
    ]  # fmt: skip
    assert chatforge(["--debug", "ppo", *common, *ppo]) == 0


def chat(model_dir: Path) -> None:
    from chatforge.inference import ChatModel

    model = ChatModel(model_dir)
    question = [{"role": "user", "content": "What is 3 + 4?"}]
    model.chat(question, max_new_tokens=8, seed=0)
    model.complete_batch([question, [{"role": "user", "content": "What is 2 * 2?"}]], max_new_tokens=8)
    "".join(model.stream_chat(question, max_new_tokens=8, temperature=0))


def main(fixture_dir: Path, task: Path, out: Path, records_file: Path) -> None:
    warnings.showwarning = record_warning
    logging.Logger.handle = handle_and_record
    sentinels()
    train(fixture_dir, task, out)
    chat(out / "ppo" / "actor")
    records_file.write_text(json.dumps(RECORDS, indent=1))


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:5]))
