"""No deprecated API is called by chatforge: short `chatforge sft`, `reward` and `ppo` runs and ChatModel
replies (tests/warnings_probe.py, a fresh process that shows every warning) raise no DeprecationWarning,
PendingDeprecationWarning or FutureWarning, and log no deprecation, from chatforge's own calls.

A deprecation is chatforge's when it is attributed to chatforge's code or when the deprecated function was
called straight from chatforge; those always fail (fix the call site). One raised inside a library by the
library's own call (chatforge -> peft -> a deprecated transformers property) cannot be fixed here: it must
be listed in LIBRARY_INTERNAL with the library call site and the reason, and an entry that stops firing
fails too, so the list stays true."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PROBE = Path(__file__).with_name("warnings_probe.py")
MACHINERY = ("/warnings.py", "/logging/__init__.py", "/utils/logging.py")  # frames of the reporting itself


@dataclass(frozen=True)
class Known:
    """A library-internal deprecation: `caller` (a path suffix) is the library frame that calls the deprecated
    API; `message` a regex of the text."""

    category: str
    message: str
    caller: str
    reason: str


LIBRARY_INTERNAL = (
    Known(
        "FutureWarning",
        r"^`is_gradient_checkpointing` is deprecated",
        "peft/peft_model.py",
        "peft 0.21.2 (the newest release) reads transformers' deprecated `is_gradient_checkpointing` property "
        "in PeftModel.__init__; chatforge's LoRA goes through peft.get_peft_model, which has no other path.",
    ),
)


def is_chatforge(path: str) -> bool:
    return "/chatforge/" in path.replace("\\", "/") and "/tests/" not in path.replace("\\", "/")


def caller_of_deprecated(record: dict) -> str:
    """The file of the frame that called the function that raised or logged the deprecation."""
    frames = [f for f, _ in record["stack"] if not f.endswith(MACHINERY)]
    return frames[-2] if len(frames) >= 2 else ""


def is_chatforges(record: dict) -> bool:
    return is_chatforge(record["filename"]) or is_chatforge(caller_of_deprecated(record))


def known_entry(record: dict) -> Known | None:
    for known in LIBRARY_INTERNAL:
        if (
            record["category"] == known.category
            and re.search(known.message, record["message"])
            and caller_of_deprecated(record).endswith(known.caller)
        ):
            return known
    return None


def describe(record: dict) -> str:
    chain = " -> ".join(f"{Path(f).name}:{fn}" for f, fn in record["stack"][-8:] if not f.endswith(MACHINERY))
    return f"{record['category']}: {record['message'][:200]}\n    at {record['filename']}:{record['lineno']}\n    via {chain}"


@pytest.fixture(scope="module")
def deprecations(fixture_dir, tmp_path_factory) -> list[dict]:
    """The deprecation records of one probe run (~25 s), the sentinels checked and removed."""
    from chatforge.fixtures import task_rows

    root = tmp_path_factory.mktemp("probe")  # not "deprecations": a logged path would match the search
    task = root / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in task_rows(600, seed=1)))
    out_file = root / "records.json"
    done = subprocess.run(
        [sys.executable, str(PROBE), str(fixture_dir), str(task), str(root / "runs"), str(out_file)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    records = [r for r in json.loads(out_file.read_text()) if r["deprecation"]]
    sentinels = [r for r in records if r["sentinel"]]
    assert {r["source"] for r in sentinels} == {"warnings", "logging"}, "the probe's hooks saw nothing"
    return [r for r in records if not r["sentinel"]]


def test_chatforge_calls_no_deprecated_api(deprecations):
    own = [describe(r) for r in deprecations if is_chatforges(r)]
    assert not own, "chatforge calls deprecated APIs (fix the call sites):\n" + "\n".join(own)


def test_every_other_deprecation_is_listed_with_its_reason(deprecations):
    unlisted = [describe(r) for r in deprecations if not is_chatforges(r) and known_entry(r) is None]
    assert not unlisted, "deprecations raised inside libraries, not in LIBRARY_INTERNAL:\n" + "\n".join(
        unlisted
    )


def test_every_listed_library_deprecation_still_fires(deprecations):
    seen = {known_entry(r) for r in deprecations}
    stale = [k.message for k in LIBRARY_INTERNAL if k not in seen]
    assert not stale, f"LIBRARY_INTERNAL entries no longer seen (remove them): {stale}"


def test_attribution_of_a_direct_call_and_a_library_internal_one():
    """The classification itself, on the two shapes of stack the probe records."""
    site = "/venv/site-packages/transformers/modeling_utils.py"
    direct = {
        "category": "FutureWarning", "message": "`gradient_checkpointing_enable` is deprecated",
        "filename": site, "lineno": 1,
        "stack": [["/src/chatforge/engine/train_engine.py", "_prepare"], [site, "gradient_checkpointing_enable"],
                  ["/usr/lib/python3.11/warnings.py", "_showwarnmsg"]],
    }  # fmt: skip
    internal = {
        **direct, "message": "`is_gradient_checkpointing` is deprecated",
        "stack": [["/src/chatforge/models/lora.py", "apply_lora"], ["/venv/site-packages/peft/peft_model.py", "__init__"],
                  [site, "is_gradient_checkpointing"], ["/usr/lib/python3.11/warnings.py", "_showwarnmsg"]],
    }  # fmt: skip
    assert is_chatforges(direct) and known_entry(direct) is None
    assert not is_chatforges(internal) and known_entry(internal) is LIBRARY_INTERNAL[0]


def test_activation_checkpointing_is_still_switched_on(fixture_dir):
    """engine.gradient_checkpointing now goes through transformers' activation_checkpointing_enable."""
    from chatforge.engine import ModelSpec, TrainEngine
    from chatforge.models.loading import LoadOptions, load_causal_lm

    path = str(fixture_dir / "llama")
    spec = ModelSpec(path, precision="fp32", learning_rate=1e-3, gradient_checkpointing=True)
    engine = TrainEngine(
        lambda dtype: load_causal_lm(path, LoadOptions(), dtype), spec,
        micro_batch_size=1, gradient_accumulation_steps=1, total_steps=1,
    )  # fmt: skip
    assert engine.module.is_activation_checkpointing and engine.module.config.use_cache is False
