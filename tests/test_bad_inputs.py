"""A catalogue of bad inputs through the real command line (`python -m chatforge ...`, a fresh process each):
data files, model dirs, settings, output dirs, reruns and CLI misuse. Each one must exit with its code (2:
bad input), print exactly one line on stderr that names the culprit and the fix, print no traceback and
nothing on stdout, and leave the files around it byte-identical: among them a finished `chatforge train`
run (step 1), the target of the rerun cases.

Server request bodies are catalogued in tests/inference/test_serve_limits.py and test_serve.py (one-line
JSON errors with 4xx codes); `chatforge serve` start-up settings in test_serve_startup.py.

Every case fails in config or input validation, before torch loads where it can (a fraction of a second)
or before any model loads (a few seconds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# The finished run the rerun cases point at: step 1 of `chatforge train` on a copy of the tiny Llama.
TINY = ["sft.train.max_steps=2", "sft.batch.micro_batch_size=4", "sft.train.report_to=[none]"]
RUN = ["train", "--actor-model", "{w}/actor", "--data", "{w}/task.jsonl", "--output-dir", "{run}",
       "--deployment-type", "cpu", "--step", "1", *TINY]  # fmt: skip
TRAIN = ["train", "--actor-model", "{w}/actor", "--data", "{w}/task.jsonl", "--output-dir", "{w}/out/t",
         "--deployment-type", "cpu"]  # fmt: skip
SFT = ["sft", "model.name_or_path={w}/actor", "data.datasets=[{w}/task.jsonl]", "train.output_dir={w}/out/s"]
PPO = ["ppo", "actor.name_or_path={w}/actor", "data.datasets=[{w}/task.jsonl]", "train.output_dir={w}/out/p"]
# Library noise that must not reach a user's terminal (CHATFORGE_VERBOSE=1 brings it back).
NOISE = ("Setting accelerator to CPU", "built successfully", "Loading weights", "Writing model shards",
         "Generating train split", "examples/s", "Traceback")  # fmt: skip


@dataclass(frozen=True)
class Case:
    args: list[str]
    says: list[str]  # fragments the one line holds, in this order
    code: int = 2
    prepare: str | None = None  # a change made to the inputs for this case only, undone after it

    def prefix(self) -> str:
        name = self.args[0]
        return "chatforge: " if name == "bogus" else f"chatforge {name}: "


def _sft(*extra: str) -> list[str]:
    return [*SFT, *extra]


def _with_data(path: str, base: list[str] = SFT) -> list[str]:
    return [a if not a.startswith("data.datasets=") else f"data.datasets=[{path}]" for a in base]


def _with_model(path: str) -> list[str]:
    return [a if not a.startswith("model.name_or_path=") else f"model.name_or_path={path}" for a in SFT]


def _swap(args: list[str], flag: str, value: str) -> list[str]:
    i = args.index(flag)
    return [*args[: i + 1], value, *args[i + 2 :]]


FIX_RERUN = "Use a new --output-dir, or --restart-from <step>"
CASES: dict[str, Case] = {
    # --- command-line misuse ---
    "unknown command": Case(["bogus"], ["invalid choice: 'bogus'", "see 'chatforge --help'"]),
    "unknown flag": Case(["sft", "--bogus"], ["unrecognized arguments: --bogus", "chatforge sft --help"]),
    "flag value out of choices": Case(
        [*TRAIN, "--actor-zero-stage", "5"],
        ["--actor-zero-stage: invalid choice: 5", "choose from 0, 1, 2, 3"],
    ),
    "override without =": Case(["sft", "fx/llama"], ["'fx/llama' must look like key=value"]),
    "step not a number": Case([*TRAIN, "--step", "x"], ["--step takes step numbers", "got x"]),
    "step out of range": Case([*TRAIN, "--step", "4"], ["steps must be a non-empty subset of [1, 2, 3]"]),
    "a step before the steps it reads": Case(
        [*TRAIN, "--step", "3"],
        [
            "step 3 (ppo) reads {w}/out/t/actor-sft, the output of step 1 (sft), which has not finished",
            "--step 1 2 3",
        ],
    ),
    "output dir is a file (train)": Case(
        _swap(TRAIN, "--output-dir", "{w}/afile"), ["--output-dir {w}/afile: {w}/afile is a file", "Fix:"]
    ),
    "restart from a step not run": Case(
        [*TRAIN, "--step", "1", "--restart-from", "3"], ["--restart-from 3: not one of the steps", "[1]"]
    ),
    # --- settings ---
    "negative epochs": Case(_sft("batch.epochs=-1"), ["batch.epochs must be >= 1, got -1"]),
    "negative learning rate": Case(_sft("model.learning_rate=-1e-4"), ["model.learning_rate must be > 0"]),
    "infinite learning rate": Case(
        _sft("model.learning_rate=inf"), ["model.learning_rate must be > 0 and finite"]
    ),
    "moved key": Case(_sft("train.epochs=2"), ["train.epochs is no longer a setting", "use batch.epochs"]),
    "wrong type": Case(_sft("batch.micro_batch_size=abc"), ["batch.micro_batch_size", "expected an integer"]),
    "value not among choices": Case(
        _sft("engine.precision=fp8"), ["engine.precision", "'fp8' is not one of"]
    ),
    "eval fraction of 1": Case(_sft("data.eval_fraction=1"), ["data.eval_fraction must be in [0, 1)"]),
    "unknown tracker": Case(_sft("train.report_to=[comet]"), ["unknown tracker(s) ['comet']", "choose from"]),
    "dataset weight 0": Case(
        _with_data("{w}/task.jsonl:0"), ["task.jsonl:0' has weight 0.0", "Fix: use a weight > 0"]
    ),
    "offload without ZeRO": Case(
        _sft("engine.offload=true"), ["engine.offload needs ZeRO >= 1", "zero_stage=2"]
    ),
    "missing config file": Case(
        ["sft", "--config", "{w}/nope.yaml"], ["config file", "nope.yaml does not exist"]
    ),
    "config file not YAML": Case(
        ["sft", "--config", "{w}/badline.jsonl"], ["badline.jsonl is not valid YAML"]
    ),
    "typo in a step-3 key": Case(
        [*TRAIN, "ppo.algorithm.nam=grpo"], ["unknown config key(s) ppo.algorithm.nam", "valid keys here"]
    ),
    "step-3 range before step 1": Case(
        [*TRAIN, "ppo.rollout.batch_size=0"], ["ppo: rollout.batch_size must be >= 1, got 0"]
    ),
    "group algorithm with one sample": Case(
        [*TRAIN, "ppo.algorithm.name=grpo"], ["ppo: algorithm.name=grpo", "n_samples_per_prompt >= 2"]
    ),
    "a key the pipeline fills": Case(
        [*TRAIN, "sft.train.output_dir=x"],
        ["sft.train.output_dir is set by chatforge train itself", "remove it"],
    ),
    "no actor model": Case(
        [a for a in TRAIN if a not in ("--actor-model", "{w}/actor")],
        ["actor_model is required", "--actor-model"],
    ),
    "no data": Case([a for a in TRAIN if a not in ("--data", "{w}/task.jsonl")], ["data.datasets is empty"]),
    "no reward at all": Case([*TRAIN, "--reward-model", "none"], ["reward_model=none needs a rule reward"]),
    "multi_node without hostfile": Case(
        _swap(TRAIN, "--deployment-type", "multi_node"), ["multi_node needs hostfile=PATH"]
    ),
    "two-part data split": Case([*TRAIN, "--data-split", "1,1"], ["data.data_split must be 3", "e.g. 2,4,4"]),
    "ppo without a reward": Case(PPO, ["step 3 needs a reward", "reward.models=[DIR]", "reward.functions"]),
    "ptx without data": Case(
        [*PPO, "reward.functions=[x:y]", "ptx.coef=0.5"], ["ptx.coef > 0 needs ptx.datasets=[FILE]"]
    ),
    "label smoothing with ipo": Case(
        ["dpo", "policy.name_or_path={w}/actor", "dpo.loss=ipo", "dpo.label_smoothing=0.1"],
        ["dpo.label_smoothing applies to the sigmoid loss only"],
    ),
    # --- data ---
    "non-UTF-8 jsonl": Case(_with_data("{w}/latin1.jsonl"), ["latin1.jsonl, row 5: not UTF-8", "Fix: save"]),
    "non-UTF-8 csv": Case(_with_data("{w}/latin1.csv"), ["latin1.csv, row 2: not UTF-8", "Fix: save"]),
    "mixed formats in one file": Case(
        _with_data("{w}/mixed.jsonl"),
        [
            "mixed.jsonl, row 3: this row looks like format 'conversational'",
            "'dschat'",
            "Fix: keep one format",
        ],
    ),
    "missing data file": Case(
        _with_data("{w}/nope.jsonl"), ["nope.jsonl: no such file", "Fix: check the path"]
    ),
    "invalid JSON line": Case(
        _with_data("{w}/badline.jsonl"), ["badline.jsonl, row 2", "invalid JSON", "Fix:"]
    ),
    "empty data file": Case(_with_data("{w}/empty.jsonl"), ["empty.jsonl: the file is empty", "Fix:"]),
    "unknown columns": Case(
        _with_data("{w}/columns.jsonl"),
        ["cannot detect the row format", "Fix: rename columns with data.columns"],
    ),
    "chat-only data for a reward model": Case(
        [
            "reward",
            "model.name_or_path={w}/actor",
            "data.datasets=[{w}/chat.jsonl]",
            "train.output_dir={w}/out/r",
        ],
        ["data.datasets: no dataset can feed step 'reward', which needs chosen+rejected", "Fix: point"],
    ),
    "chat-only data for a pipeline that needs pairs": Case(
        _swap(TRAIN, "--data", "{w}/chat.jsonl"),
        ["reward: no dataset can feed step 'reward'", "chat.jsonl", "Fix: add such data to --data"],
    ),
    "data inspect of a non-UTF-8 file": Case(
        ["data", "inspect", "{w}/latin1.jsonl"], ["latin1.jsonl, row 5"]
    ),
    # --- models ---
    "missing model dir": Case(
        _with_model("{w}/no/such/model"), ["model dir", "no/such/model does not exist"]
    ),
    "missing model dir, relative": Case(_with_model("runs/x/actor-sft"), ["runs/x/actor-sft does not exist"]),
    "missing model dir, train with auto": Case(
        _swap(_swap(TRAIN, "--deployment-type", "auto"), "--actor-model", "{w}/no/such/model"),
        ["no/such/model does not exist"],
    ),
    "model without tokenizer": Case(
        _with_model("{w}/notok"), ["notok has no tokenizer files", "save_pretrained"]
    ),
    "truncated weights": Case(
        _with_model("{w}/trunc"), ["trunc/model.safetensors is incomplete or corrupt", "copy or export"]
    ),
    "model needing remote code": Case(
        _with_model("{w}/remote"), ["remote needs its own modelling code", "engine.trust_remote_code=true"]
    ),
    "dir without config.json": Case(
        _with_model("{w}/emptydir"), ["emptydir is not a Hugging Face model dir"]
    ),
    "model path is a file": Case(_with_model("{w}/afile"), ["afile is a file, not a model dir"]),
    "reward model with two labels": Case(
        [*PPO, "reward.models=[{w}/rm2]"], ["rm2 has a score head with num_labels=2, not 1", "DIR/reward"]
    ),
    "causal LM as reward model": Case(
        [*PPO, "reward.models=[{w}/actor]"], ["actor is not a reward model (LlamaForCausalLM", "DIR/reward"]
    ),
    "reward function not importable": Case(
        [*PPO, "reward.functions=[nomod:fn]", "algorithm.name=grpo", "rollout.n_samples_per_prompt=2"],
        ["'nomod:fn' cannot be imported", "package.module:function"],
    ),
    "chat with a missing model": Case(["chat", "--model", "{w}/no/such/m"], ["no such model dir"]),
    # --- output dirs ---
    "output dir is a file": Case(
        [*SFT[:-1], "train.output_dir={w}/afile"], ["train.output_dir", "afile is a file, not a dir"]
    ),
    "output dir under a file": Case(
        [*SFT[:-1], "train.output_dir={w}/afile/sub"], ["cannot create train.output_dir", "afile is a file"]
    ),
    "reward run into the SFT run dir": Case(
        [
            "reward",
            "model.name_or_path={w}/actor",
            "data.datasets=[{w}/task.jsonl]",
            "train.output_dir={run}/runs/sft",
        ],
        ["holds a 'sft' run; a 'reward' run cannot write there", "the default for reward is runs/reward"],
    ),
    "fresh SFT run into a finished one": Case(
        [*SFT[:-1], "train.output_dir={run}/runs/sft"], ["holds a finished 'sft' run", "--resume"]
    ),
    "report of a missing dir": Case(["report", "{w}/no-run"], ["no-run is not a directory"]),
    # --- reruns of the finished run ---
    "rerun with other data": Case(
        _swap(RUN, "--data", "{w}/chat.jsonl"), ["setting data.datasets was", "chat.jsonl", FIX_RERUN]
    ),
    "rerun with changed data content": Case(
        RUN, ["the content of data file", "task.jsonl changed since", FIX_RERUN], prepare="change data"
    ),
    "rerun with another model": Case(
        _swap(RUN, "--actor-model", "{fx}/qwen2"), ["setting model.name_or_path was", "qwen2", FIX_RERUN]
    ),
    "rerun with changed model weights": Case(
        RUN,
        ["model", "actor changed since (its config.json or weight files)", FIX_RERUN],
        prepare="touch model",
    ),
    "rerun with other settings": Case(
        [*RUN, "sft.train.max_steps=3"], ["setting train.max_steps was 2, now 3", FIX_RERUN]
    ),
    "restart from 2 with step-1 changes": Case(
        [
            *RUN[: RUN.index("--step")],
            "--step",
            "1",
            "2",
            "--restart-from",
            "2",
            *TINY,
            "sft.train.max_steps=3",
        ],
        ["step 'sft'", "(finished) was made from other inputs", "setting train.max_steps was 2, now 3"],
    ),
}


def _hash_tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of the content of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "CHATFORGE_VERBOSE"}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def chatforge(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatforge", *args], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def _write_bad_inputs(w: Path, fixture_dir: Path) -> None:
    from chatforge.fixtures import task_rows

    rows = task_rows(120, seed=0, max_operand=4)
    lines = [json.dumps(r) for r in rows]
    (w / "task.jsonl").write_text("".join(line + "\n" for line in lines))
    bad_row = b'{"prompt": "\\n\\nHuman: caf\xe9?\\n\\nAssistant:", "response": "x"}\n'
    head = "".join(line + "\n" for line in lines[:4]).encode()
    (w / "latin1.jsonl").write_bytes(head + bad_row + "".join(x + "\n" for x in lines[4:20]).encode())
    (w / "latin1.csv").write_bytes(b"prompt,completion\nhi,there\nhey,caf\xe9\n")
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    mixed = [rows[0], rows[1], {"messages": chat}, *rows[2:20]]
    (w / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mixed))
    (w / "chat.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(60)))
    (w / "badline.jsonl").write_text(lines[0] + "\n" + '{"prompt": "a",}\n')
    (w / "empty.jsonl").write_text("")
    (w / "columns.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    (w / "afile").write_text("not a dir\n")
    (w / "emptydir").mkdir()
    _write_bad_models(w, fixture_dir)


def _write_bad_models(w: Path, fixture_dir: Path) -> None:
    shutil.copytree(fixture_dir / "llama", w / "actor")
    shutil.copytree(fixture_dir / "llama", w / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (w / "notok" / name).unlink()
    shutil.copytree(fixture_dir / "reward-llama", w / "rm2")
    _edit_config(w / "rm2", id2label={"0": "BAD", "1": "GOOD"}, label2id={"BAD": 0, "GOOD": 1})
    shutil.copytree(fixture_dir / "llama", w / "trunc")
    weights = w / "trunc" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(fixture_dir / "llama", w / "remote")
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    _edit_config(w / "remote", model_type="chatforge_custom", auto_map=auto_map)


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def world(fixture_dir, tmp_path_factory) -> dict:
    """The inputs of the cases and a finished `chatforge train` step 1 (its output checked for noise)."""
    w = tmp_path_factory.mktemp("catalogue")
    _write_bad_inputs(w, fixture_dir)
    paths = {"w": str(w), "run": str(w / "run"), "fx": str(fixture_dir)}
    proc = chatforge([a.format(**paths) for a in RUN], cwd=w)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (w / "run" / "runs" / "sft" / "DONE").is_file()
    output = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in output], output  # a training run's output is chatforge's own
    return paths


@contextlib.contextmanager
def prepared(kind: str | None, w: Path):
    """Change an input of the finished run for one case, and undo it (content and times) afterwards."""
    if kind is None:
        yield
        return
    path = w / ("task.jsonl" if kind == "change data" else "actor/model.safetensors")
    before, stat = path.read_bytes(), path.stat()
    if kind == "change data":
        path.write_bytes(before.replace(b"The answer is", b"It is", 1))
    else:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        yield
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_changes_nothing(name, world):
    case = CASES[name]
    w = Path(world["w"])
    before = _hash_tree(w)
    with prepared(case.prepare, w):
        proc = chatforge([a.format(**world) for a in case.args], cwd=w)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == case.code, proc.stdout + proc.stderr
    assert len(lines) == 1 and proc.stdout == "", proc.stdout + proc.stderr
    line = lines[0]
    assert line.startswith(case.prefix()) and "Traceback" not in line, line
    positions = [line.find(fragment.format(**world)) for fragment in case.says]
    assert -1 not in positions and positions == sorted(positions), line
    assert _hash_tree(w) == before, f"{name} changed files around it"
