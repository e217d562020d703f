"""`chatforge data inspect`: what the data layer makes of some dataset specs, in plain text."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .errors import DataError
from .pipeline import DataSettings, can_serve, load_step_data, load_unified, read_source
from .spec import parse_spec
from .split import SPLIT_STEPS, STEPS, step_part, train_eval
from .tokenize import IGNORE_INDEX


def inspect_report(cfg, tokenizer=None, cache_dir: str | None = None) -> str:
    """Detected format and rows per step of each source; with a tokenizer also token-length stats,
    truncation/drop counts and one rendered example per step."""
    lines: list[str] = []
    cache = tempfile.TemporaryDirectory(prefix="chatforge-inspect-")
    with cache:
        cfg = DataSettings.of(cfg, cache_dir=cache_dir or cache.name)
        served = set()
        for text in cfg.datasets:
            served |= _describe_source(text, cfg, str(Path(cfg.cache_dir) / "raw"), lines)
        if tokenizer is not None:
            for step in (s for s in STEPS if s in served):
                _describe_step(cfg, tokenizer, step, lines)
    return "\n".join(lines)


def _describe_source(text: str, cfg, raw_cache: str, lines: list[str]) -> set[str]:
    spec = parse_spec(text)
    raw, fmt_name, fmt, _ = read_source(spec, cfg, raw_cache)
    load_unified(text, cfg)  # validates every row, so a bad row is reported even without a tokenizer
    lines.append(f"== {spec.name}  (weight {spec.weight:g}, role {spec.role})")
    lines.append(f"format: {fmt_name}   rows: {len(raw)}   columns: {', '.join(raw.column_names)}")
    lines.append("  rows per step (before weighting):")
    steps = {s for s in STEPS if can_serve(fmt, raw.column_names, s)}
    for step in SPLIT_STEPS:
        train, evals = train_eval(
            step_part(len(raw), cfg.data_split, spec.role, step, cfg.seed), cfg.eval_fraction
        )
        note = "" if step in steps else "  (not servable: missing columns)"
        lines.append(f"  {step:7s} train {len(train):7d}  eval {len(evals):6d}{note}")
    lines.append("")
    return {
        s for s in steps if s == "ptx" or len(step_part(len(raw), cfg.data_split, spec.role, s, cfg.seed))
    }


def _describe_step(cfg, tokenizer, step: str, lines: list[str]) -> None:
    lines.append(f"== step {step}")
    try:
        data = load_step_data(cfg, tokenizer, step)
    except DataError as err:
        lines.append(f"  n/a: {err}\n")
        return
    st = data.stats
    lines.append(f"  train rows {st['train_rows']}  eval rows {st['eval_rows']}  packed {st['packed']}")
    lines.append(f"  truncated {json.dumps(st['truncated'])}  dropped {json.dumps(st['dropped'])}")
    for col, d in st["token_lengths"]["train"].items():
        lines.append(f"  {col} lengths: {json.dumps(d)}")
    lines.append("  example:")
    lines += ["    " + line for line in render_example(data.train[0], tokenizer, step).splitlines()]
    lines.append("")


def render_example(row: dict, tokenizer, step: str) -> str:
    """Decoded text of one token row; SFT/PTX loss tokens are shown between [[ and ]]."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    if step == "reward":
        prompt = row["chosen_input_ids"][: row["prompt_len"]]
        chosen = row["chosen_input_ids"][row["prompt_len"] :]
        rejected = row["rejected_input_ids"][row["prompt_len"] :]
        return f"prompt: {decode(prompt)!r}\nchosen: {decode(chosen)!r}\nrejected: {decode(rejected)!r}"
    if step == "ppo":
        return f"prompt: {decode(row['prompt_input_ids'])!r}"
    pieces, run, in_loss = [], [], False
    for tok, label in zip(row["input_ids"], row["labels"]):
        if (label != IGNORE_INDEX) != in_loss:
            pieces.append(decode(run) + ("]]" if in_loss else "[["))
            run, in_loss = [], not in_loss
        run.append(tok)
    pieces.append(decode(run) + ("]]" if in_loss else ""))
    return repr("".join(pieces))
