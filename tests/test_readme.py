"""The README is true: its Python blocks run, its `chatforge` command lines parse (subcommand, flags and
config keys), its `make` targets exist, and the files README.md and docs/*.md point to exist.

Blocks are taken from the README itself, so editing the README edits the test: a YAML block whose first line
is `# NAME.yaml` is written to NAME.yaml, then the Python blocks run in order, each as its own script, in one
temporary dir (a block may use the files an earlier one wrote, not its variables)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# Launchers that run `python -m chatforge.cli ...`: the arguments after the module are chatforge's.
MODULE_FORMS = ("-m chatforge.cli", "--module chatforge.cli")


def blocks(lang: str, path: Path = README) -> list[str]:
    return [body for kind, body in FENCE.findall(path.read_text()) if kind == lang]


def write_yaml_blocks(directory: Path) -> list[str]:
    """Write each `# NAME.yaml` block of the README into `directory`; returns the names."""
    names = []
    for body in blocks("yaml"):
        first = body.splitlines()[0]
        match = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first)
        if match:
            (directory / match.group(1)).write_text(body)
            names.append(match.group(1))
    return names


# --- Python blocks --------------------------------------------------------------------------------------
def test_python_blocks_run(tmp_path):
    """Today's blocks: the Python API example end to end (stand-in fixtures; SFT and reward model from the
    YAML blocks; PPO from a dict with a hand-written loop; a chat reply), ~30 s on 2 cores."""
    write_yaml_blocks(tmp_path)
    scripts = blocks("python")
    assert scripts
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    for i, code in enumerate(scripts):
        script = tmp_path / f"readme_block_{i}.py"
        script.write_text(code)
        done = subprocess.run(
            [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, (
            f"README python block {i} failed:\n{code}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    assert (tmp_path / "runs" / "ppo" / "actor" / "config.json").is_file()  # the example did its work


# --- command lines ---------------------------------------------------------------------------------------
def command_lines(text: str) -> list[str]:
    """Shell lines of bash blocks (continuations joined) and inline `code` spans that run chatforge."""
    lines = []
    for body in [b for kind, b in FENCE.findall(text) if kind in ("bash", "sh", "")]:
        lines += body.replace("\\\n", " ").splitlines()
    prose = FENCE.sub("", text)
    lines += re.findall(r"`([^`\n]*chatforge[^`\n]*)`", prose)
    return [line for line in lines if _chatforge_args(line) is not None]


def _chatforge_args(line: str) -> list[str] | None:
    """The arguments chatforge gets from a command line, or None when it does not run chatforge."""
    # Usage brackets ([--port N]) are dropped; a config value's list (key=[a,b]) stays.
    tokens = shlex.split(re.sub(r"(?<!=)\[([^\]]*)\]", r" \1 ", line), comments=True)
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value prefixes
        tokens.pop(0)
    if tokens[:1] == ["chatforge"]:
        return tokens[1:]
    joined = " ".join(tokens)
    for form in MODULE_FORMS:
        if form in joined:
            return shlex.split(joined.split(form, 1)[1])
    return None


def check_config_keys(args, tmp_path: Path) -> None:
    """The overrides (and --config file) of a config command name real keys: merged into a dict and read by
    `from_dict`, which refuses unknown and renamed keys. Required values are not asked for: README lines
    leave out what a real run would add."""
    import yaml

    from chatforge.cli.pipeline_cmds import flag_overrides, split_overrides
    from chatforge.cli.train_cmds import CONFIG_COMMANDS, _resolve
    from chatforge.config import from_dict, merge_overrides

    if args.command == "train":
        from chatforge.pipeline.config import PipelineConfig

        split_overrides(args)
        cls, overrides = PipelineConfig, [*args.overrides, *flag_overrides(args)]
    else:
        cls, overrides = _resolve(CONFIG_COMMANDS[args.command][0]), list(args.overrides)
    data = {}
    if args.config:
        config_file = tmp_path / args.config
        assert config_file.is_file(), f"--config {args.config}: no such YAML block in the README"
        data = yaml.safe_load(config_file.read_text())
    from_dict(cls, merge_overrides(data, overrides))


def test_every_chatforge_command_line_parses(tmp_path):
    from chatforge.cli import build_parser
    from chatforge.cli.train_cmds import CONFIG_COMMANDS

    write_yaml_blocks(tmp_path)
    parser = build_parser()
    lines = command_lines(README.read_text())
    assert len(lines) >= 15, lines  # the extraction still finds them
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for line in lines:
        argv = _chatforge_args(line)
        if not argv:  # the tool's name in prose
            continue
        if len(argv) == 1:  # prose naming a command (`chatforge serve`), not a command line
            assert argv[0] in commands, line
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command does not parse ({exc.code}): {line}")
        assert args.command, line
        if args.command == "train" or args.command in CONFIG_COMMANDS:
            try:
                check_config_keys(args, tmp_path)
            except Exception as exc:
                pytest.fail(f"README command has a bad setting: {line}\n{exc}")


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    used = set(re.findall(r"\bmake ([\w-]+)", README.read_text()))
    assert used and used <= targets, used - targets


# --- paths -----------------------------------------------------------------------------------------------
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Repo paths named in backticks: a top-level dir of the repo, then a path.
REPO_PATH = re.compile(r"`((?:docs|benchmarks|tests|src)/[\w./-]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_paths_the_docs_point_to_exist(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links
        if "://" not in target and not (doc.parent / target).exists():
            missing.append(target)
    missing += [p for p in REPO_PATH.findall(text) if not (ROOT / p).exists()]
    assert not missing, f"{doc.name} points to files that do not exist: {missing}"
