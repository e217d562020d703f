"""`load_step_data`: specs -> unified rows -> step split -> tokens -> blend -> (pack) -> cached Arrow.

The result of one (data files, tokenizer, settings, step) combination is cached under
cache_dir/<sha256 key>/ as train.arrow, eval.arrow (memory-mapped) and stats.json. A build runs in a
private temp dir and is published with one atomic rename, so several ranks may build at once: the
first rename wins and the others discard their copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .formats import check_columns, check_row_shapes, detect_format, make_normaliser, unified_features
from .packing import pack_rows
from .render import FALLBACK_TEMPLATE, ChatRenderer, end_of_turn_ids
from .sources import fingerprint, load_source
from .spec import DatasetSpec, parse_spec
from .split import STEPS, serves, step_part, train_eval, weighted_indices
from .tokenize import STEP_COLUMNS, Limits, Tally, make_tokeniser

CACHE_VERSION = 2
# The step split and the blend order are fixed per dataset (not per run): steps run as separate commands
# stay disjoint, and every seed of a sweep is evaluated on the same held-out rows.
DATA_SEED = 1234
LENGTH_COLUMNS = {
    "sft": "input_ids",
    "ptx": "input_ids",
    "reward": "chosen_input_ids",
    "ppo": "prompt_input_ids",
}
# Source columns (after data.columns renames) a dataset needs to serve each step; any alternative will do.
STEP_NEEDS = {
    "sft": (("completion",), ("response",), ("messages",), ("chosen",)),
    "reward": (("chosen", "rejected"),),
    "ppo": (("prompt",), ("messages",), ("chosen", "rejected")),
    "ptx": (("text",),),
}


@dataclass(frozen=True)
class DataSettings:
    """What the data layer reads from any step's data config (fields a step lacks take their defaults)."""

    datasets: tuple[str, ...]
    data_split: tuple[float, ...] = (2.0, 4.0, 4.0)
    eval_fraction: float = 0.05
    columns: tuple[tuple[str, str], ...] = ()
    max_prompt_length: int = 256
    max_length: int = 512
    loss_on: str = "assistant"
    packing: bool = False
    format: str = "auto"
    split: str = "train"
    cache_dir: str = ""

    @classmethod
    def of(cls, cfg, **overrides) -> DataSettings:
        names = [f for f in cls.__dataclass_fields__ if f not in ("cache_dir",)]
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        values.update(overrides)
        values["datasets"] = tuple(values.get("datasets", ()))
        values["data_split"] = tuple(values.get("data_split", cls.data_split))
        values["columns"] = tuple(sorted(dict(values.get("columns", ())).items()))
        values["cache_dir"] = overrides.get("cache_dir") or default_cache_dir()
        return cls(**values)

    @property
    def seed(self) -> int:
        return DATA_SEED


def default_cache_dir() -> str:
    """$CHATFORGE_CACHE_DIR, else ~/.cache/chatforge/data."""
    return os.path.expanduser(os.environ.get("CHATFORGE_CACHE_DIR") or "~/.cache/chatforge/data")


@dataclass
class StepData:
    """Token rows of one step. train/eval: Arrow-backed `datasets.Dataset`s (see tokenize.py for rows)."""

    train: object
    eval: object
    stats: dict


def load_step_data(cfg, tokenizer, step: str, **overrides) -> StepData:
    """Build (or reuse from the cache) the train/eval token rows of `step` in {sft, reward, ppo, ptx}.

    `cfg` is any step's data config (or a DataSettings); `overrides` set DataSettings fields."""
    if step not in STEPS:
        raise DataError(f"unknown step '{step}'. Fix: use one of {', '.join(STEPS)}")
    cfg = cfg if isinstance(cfg, DataSettings) and not overrides else DataSettings.of(cfg, **overrides)
    if not cfg.datasets:
        raise DataError("data.datasets is empty. Fix: list at least one 'name_or_path[:weight]'")
    specs = [parse_spec(s) for s in cfg.datasets]
    root = Path(cfg.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(cfg, specs, tokenizer, step)
    final = root / key
    if not (final / "stats.json").exists():
        _build_and_publish(cfg, specs, tokenizer, step, root, final)
        return _open(final, step, hit=False)
    return _open(final, step, hit=True)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what changes token ids: vocabulary/merges, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, vocab, str(tokenizer.chat_template), str(tokenizer.all_special_tokens)]
    parts += [str(tokenizer.eos_token_id), str(tokenizer.pad_token_id), str(tokenizer.bos_token_id)]
    parts += [str(end_of_turn_ids(tokenizer))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def cache_key(cfg, specs: list[DatasetSpec], tokenizer, step: str) -> str:
    settings = {
        k: getattr(cfg, k)
        for k in (
            "data_split",
            "eval_fraction",
            "format",
            "columns",
            "split",
            "max_prompt_length",
            "max_length",
            "loss_on",
            "packing",
        )
    }
    settings["seed"] = cfg.seed
    payload = {
        "version": CACHE_VERSION,
        "step": step,
        "sources": [[s.path, s.weight, s.role, s.split, s.format, fingerprint(s)] for s in specs],
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return (
        f"{step}-"
        + hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
    )


def _build_and_publish(cfg, specs, tokenizer, step: str, root: Path, final: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        stats = _build(cfg, specs, tokenizer, step, tmp, final.name)
        for scratch in tmp.glob("scratch-*"):
            scratch.unlink()
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "stats.json").exists():
                raise  # not the "another rank published first" case
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open(final: Path, step: str, hit: bool) -> StepData:
    import datasets

    stats = json.loads((final / "stats.json").read_text())
    stats.update(cache_hit=hit, cache_path=str(final))
    splits = {}
    for split in ("train", "eval"):
        path = final / f"{split}.arrow"
        if path.exists():
            splits[split] = datasets.Dataset.from_file(str(path))
        else:  # an empty split (e.g. eval_fraction=0): no file, same columns
            splits[split] = datasets.Dataset.from_dict({c: [] for c in _output_columns(step, stats)})
    return StepData(train=splits["train"], eval=splits["eval"], stats=stats)


def _output_columns(step: str, stats: dict) -> tuple[str, ...]:
    return (*STEP_COLUMNS[step], "position_ids") if stats.get("packed") else STEP_COLUMNS[step]


def _fp(key: str, stage: str) -> str:
    """A `datasets` fingerprint for one stage (avoids hashing our closures, which pulls in the tokenizer)."""
    return hashlib.sha256(f"{key}/{stage}".encode()).hexdigest()[:32]


def read_source(spec: DatasetSpec, cfg, raw_cache: str):
    """Load one source, apply data.columns renames and pick its format -> (raw Dataset, format name, Format,
    whether the format was detected)."""
    raw = load_source(spec, cfg.split, raw_cache)
    renames = {a: b for a, b in dict(cfg.columns).items() if a in raw.column_names and a != b}
    clash = [b for b in renames.values() if b in raw.column_names and b not in renames]
    if clash:
        raise DataError(
            f"{spec.path}: data.columns renames onto existing column(s) {clash}. Fix: drop or rename those first"
        )
    raw = raw.rename_columns(renames) if renames else raw
    fmt_name = spec.format or cfg.format
    detected = fmt_name == "auto"
    if detected:
        first = raw[0]
        fmt_name = detect_format([k for k, v in first.items() if v is not None], first, spec.path)
    return raw, fmt_name, check_columns(fmt_name, raw.column_names, spec.path), detected


def can_serve(fmt, columns: list[str], step: str) -> bool:
    """Whether a source with these columns, read with Format `fmt`, has what `step` needs."""
    readable = set(fmt.columns) & set(columns)
    return any(set(alt) <= readable for alt in STEP_NEEDS[step])


def load_unified(spec_text: str, cfg):
    """The unified rows of one spec (for inspection and tests; cached by `datasets` next to the source)."""
    spec = parse_spec(spec_text)
    cfg = cfg if isinstance(cfg, DataSettings) else DataSettings.of(cfg)
    raw, fmt_name, fmt, detected = read_source(spec, cfg, str(Path(cfg.cache_dir) / "raw"))
    normalise = make_normaliser(fmt, spec.path, fmt_name if detected else None)
    return raw.map(
        normalise,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=unified_features(),
        keep_in_memory=True,
    ), fmt_name


def _unified(spec: DatasetSpec, index: int, cfg, tmp: Path, key: str, step: str):
    """Read, check and normalise one source -> (unified Dataset, format name)."""
    raw, fmt_name, fmt, detected = read_source(spec, cfg, str(tmp.parent / "raw"))
    if not can_serve(fmt, raw.column_names, step):
        need = " or ".join("+".join(alt) for alt in STEP_NEEDS[step])
        raise DataError(
            f"{spec.path} (format '{fmt_name}', columns {sorted(raw.column_names)}) cannot serve step '{step}': "
            f"it needs {need}. Fix: mark it ':sft' (SFT only) or ':prompts' (PPO prompts only), "
            "or remove it from this step's data.datasets"
        )
    unified = raw.map(
        make_normaliser(fmt, spec.path, fmt_name if detected else None),
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=unified_features(),
        cache_file_name=str(tmp / f"scratch-norm-{index}.arrow"),
        new_fingerprint=_fp(key, f"norm-{index}"),
        desc=f"reading {spec.name}",
    )
    return unified, fmt_name


def _step_features(step: str):
    from datasets import Features, List, Value

    kinds = {"prompt_len": Value("int32"), "prompt_messages": Value("string"), "extra": Value("string")}
    return Features({c: kinds.get(c, List(Value("int32"))) for c in STEP_COLUMNS[step]})


def _tokenise_part(
    unified, idx: np.ndarray, step: str, renderer, lim: Limits, name: str, out: Path, key: str
):
    """Token rows of unified[idx] (in idx order) and the Tally of truncations/drops."""
    tally = Tally()
    part = unified.select(idx)
    tokens = part.map(
        make_tokeniser(step, renderer, lim, tally, name),
        batched=True,
        remove_columns=part.column_names,
        features=_step_features(step),
        cache_file_name=str(out),
        new_fingerprint=_fp(key, out.name),
        desc=f"tokenising {name}",
    )
    return tokens, tally


def _build(cfg, specs: list[DatasetSpec], tokenizer, step: str, tmp: Path, key: str) -> dict:
    """Write tmp/train.arrow and tmp/eval.arrow (when non-empty); return the stats."""
    # PTX rows are plain text: no chat template needed, so no "no template" warning either.
    renderer = ChatRenderer(tokenizer, template=FALLBACK_TEMPLATE if step == "ptx" else None)
    lim = Limits(cfg.max_prompt_length, cfg.max_length, cfg.loss_on)
    parts: dict[str, list] = {"train": [], "eval": []}
    sources: dict[str, dict] = {}
    totals = Tally()
    for i, spec in enumerate(specs):
        entry = sources.setdefault(spec.name if spec.name not in sources else f"{spec.name}#{i}", {})
        entry.update(role=spec.role, weight=spec.weight)
        if not serves(spec.role, step):
            entry.update(skipped=f"marked ':{spec.role}'", train=0, eval=0)
            continue
        unified, entry["format"] = _unified(spec, i, cfg, tmp, key, step)
        part = step_part(len(unified), cfg.data_split, spec.role, step, cfg.seed)
        entry.update(rows=len(unified), step_rows=len(part))
        for split, idx in zip(("train", "eval"), train_eval(part, cfg.eval_fraction)):
            entry[split] = 0
            if len(idx) == 0:
                continue
            out = tmp / f"scratch-{split}-{i}.arrow"
            tokens, tally = _tokenise_part(unified, idx, step, renderer, lim, spec.path, out, key)
            totals.update(tally)
            entry[split] = len(tokens)
            entry.update({f"{split}_{k}": v for k, v in tally.items()})
            take = np.arange(len(tokens))
            if split == "train":
                take = weighted_indices(len(tokens), spec.weight, cfg.seed + i)
                entry["train_weighted"] = len(take)
            parts[split].append((tokens, take))
    return _blend_all(parts, sources, totals, cfg, step, tmp, key)


def _blend_all(parts: dict, sources: dict, totals: Tally, cfg, step: str, tmp: Path, key: str) -> dict:
    packed = bool(cfg.packing and step in ("sft", "ptx"))
    stats: dict = {"step": step, "packed": packed, "sources": sources, "token_lengths": {}}
    stats["truncated"] = {k[len("truncated_") :]: v for k, v in totals.items() if k.startswith("truncated_")}
    stats["dropped"] = {k[len("dropped_") :]: v for k, v in totals.items() if k.startswith("dropped_")}
    stats["chunked_text"] = totals.get("chunked_text", 0)
    for split in ("train", "eval"):
        rows, lengths = _blend(parts[split], split, packed, cfg, step, tmp, key)
        stats[f"{split}_rows"] = rows
        stats[f"{split}_sequences"] = len(next(iter(lengths.values()), []))
        stats["token_lengths"][split] = {col: _describe(v) for col, v in lengths.items()}
    if stats["train_rows"] == 0:
        raise DataError(
            f"no training rows for step '{step}' (per source: "
            f"{ {k: v.get('skipped', v.get('train', 0)) for k, v in sources.items()} }, dropped: {stats['dropped']}). "
            "Fix: give this step a share in data.data_split, unmark ':sft'/':prompts' datasets, "
            "or raise data.max_length / data.max_prompt_length"
        )
    return stats


def _blend(parts: list, split: str, packed: bool, cfg, step: str, tmp: Path, key: str) -> tuple[int, dict]:
    """Concatenate the sources' token rows in weighted (train: shuffled) order into tmp/<split>.arrow.
    Returns (rows written, {column: per-sequence token lengths before packing})."""
    import datasets
    import pyarrow.compute as pc

    parts = [(tokens, take) for tokens, take in parts if len(take)]
    if not parts:
        return 0, {}
    offsets = np.cumsum([0] + [len(t) for t, _ in parts])
    order = np.concatenate([off + take for (_, take), off in zip(parts, offsets)])
    if split == "train":
        order = np.random.default_rng(cfg.seed).permutation(order)
    columns = [c for c in STEP_COLUMNS[step] if c not in ("prompt_len", "prompt_messages", "extra")]
    lengths = {
        c: np.concatenate([pc.list_value_length(t.data.column(c)).to_numpy() for t, _ in parts])[order]
        for c in columns
    }
    blended = datasets.concatenate_datasets([t for t, _ in parts]).select(order)
    out, fingerprint_ = str(tmp / f"{split}.arrow"), _fp(key, split)
    if packed:
        result = blended.map(
            pack_rows,
            batched=True,
            fn_kwargs={"max_length": cfg.max_length},
            remove_columns=blended.column_names,
            cache_file_name=out,
            new_fingerprint=fingerprint_,
            desc="packing",
        )
    else:
        result = blended.flatten_indices(cache_file_name=out, new_fingerprint=fingerprint_)
    return len(result), lengths


def _describe(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {"count": 0}
    return {
        "count": int(len(lengths)),
        "tokens": int(lengths.sum()),
        "min": int(lengths.min()),
        "mean": round(float(lengths.mean()), 2),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


PIPELINE_DATA_FIX = (
    "add such data to --data, give the step a share in --data-split, or change the steps that run"
)


def check_step_data(cfg, step: str, setting: str, fix: str = PIPELINE_DATA_FIX) -> None:
    """Before a step (or a whole pipeline) starts: at least one dataset of `cfg` can feed `step` (its format
    has the columns the step needs, and the split gives the step rows), or a DataError naming the datasets
    and the fix."""
    settings = cfg if isinstance(cfg, DataSettings) else DataSettings.of(cfg)
    seen = []
    for text in settings.datasets:
        spec = parse_spec(text)
        raw, fmt_name, fmt, detected = read_source(spec, settings, str(Path(settings.cache_dir) / "raw"))
        if detected:
            check_row_shapes(raw, fmt_name, spec.path)
        share = len(step_part(len(raw), settings.data_split, spec.role, step, settings.seed))
        if can_serve(fmt, raw.column_names, step) and share > 0:
            return
        seen.append(
            f"{spec.path} (format {fmt_name}, columns {sorted(raw.column_names)}, {share} rows for it)"
        )
    need = " or ".join("+".join(alt) for alt in STEP_NEEDS[step])
    raise DataError(
        f"{setting}: no dataset can feed step '{step}', which needs {need}: {'; '.join(seen)}. Fix: {fix}"
    )
