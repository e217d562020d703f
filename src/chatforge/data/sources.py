"""Read a dataset spec into an Arrow-backed (memory-mapped) `datasets.Dataset`, with clear errors.

Local files are read by the `datasets` packaged readers into Arrow files under our cache dir, so a
1 GB file is memory-mapped, never held as Python objects. Hub names go through `load_dataset`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from .errors import DataError, row_error
from .spec import DatasetSpec

FILE_READERS = {".json": "from_json", ".jsonl": "from_json", ".parquet": "from_parquet", ".csv": "from_csv"}
_PATHLIKE_PREFIXES = ("/", "./", "../", "~")


def is_local(spec: DatasetSpec) -> bool:
    """True when the spec names a local file or dir (existing, or one that looks like a path)."""
    path = spec.path
    return (
        os.path.exists(os.path.expanduser(path))
        or path.startswith(_PATHLIKE_PREFIXES)
        or (Path(path).suffix.lower() in FILE_READERS)
    )


def fingerprint(spec: DatasetSpec) -> list:
    """What identifies the source's content for the cache key: (path, size, mtime) of every file."""
    if not is_local(spec):
        return [spec.path, spec.split]
    root = Path(os.path.expanduser(spec.path)).resolve()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [spec.split] + [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def load_source(spec: DatasetSpec, default_split: str, raw_cache: str):
    """Return the spec's rows as a `datasets.Dataset` (columns as in the source). Raises DataError."""
    split = spec.split or default_split
    ds = _load_local(spec, split, raw_cache) if is_local(spec) else _load_hub(spec, split, raw_cache)
    if len(ds) == 0:
        raise DataError(f"{spec.path}: the dataset has no rows. Fix: point data.datasets at a non-empty file")
    return ds


def _load_hub(spec: DatasetSpec, split: str, raw_cache: str):
    import datasets

    try:
        return datasets.load_dataset(spec.path, split=split, cache_dir=raw_cache)
    except Exception as exc:  # the hub raises many types; the user needs one message
        raise DataError(
            f"{spec.path}: could not load it from the Hugging Face Hub (split '{split}'): {exc}. "
            "Fix: check the name and split, your network (HF_DATASETS_OFFLINE), or give a local file path"
        ) from exc


def _load_local(spec: DatasetSpec, split: str, raw_cache: str):
    path = Path(os.path.expanduser(spec.path))
    if not path.exists():
        raise DataError(f"{spec.path}: no such file or directory. Fix: check the path in data.datasets")
    if path.is_dir():
        return _load_arrow_dir(spec, path, split)
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{spec.path}: unsupported file type '{path.suffix}'. "
            f"Fix: use one of {', '.join(FILE_READERS)} or an Arrow dir written by save_to_disk"
        )
    if not os.access(path, os.R_OK):
        raise DataError(f"{spec.path}: the file is not readable. Fix: check its permissions")
    return _read_file(spec, path, reader, raw_cache)


def _read_file(spec: DatasetSpec, path: Path, reader: str, raw_cache: str):
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"{spec.path}: the file is empty. Fix: point data.datasets at a non-empty file")
    try:
        # CSV cells are text: without dtype=str pandas would turn a reply like "4" into an int.
        extra = {"features": _csv_text_features(spec.path, path)} if reader == "from_csv" else {}
        with _quiet_reader_errors():
            ds = getattr(datasets.Dataset, reader)(str(path), cache_dir=raw_cache, **extra)
    except Exception as exc:  # pyarrow/pandas parse errors come wrapped several levels deep
        if _caused_by(exc, UnicodeDecodeError):
            raise _utf8_error(spec.path, path) from exc
        if path.suffix.lower() in (".json", ".jsonl"):
            located = _locate_json_error(spec.path, path)
            if located is not None:
                raise located from exc
        cause = exc.__cause__ or exc
        raise DataError(
            f"{spec.path}: cannot read it as {path.suffix[1:]} ({type(cause).__name__}: {cause}). "
            "Fix: check that the file is complete and in the format its extension says"
        ) from exc
    if reader != "from_parquet":
        _check_utf8(spec.path, path, ds)
    return ds


@contextlib.contextmanager
def _quiet_reader_errors():
    """The packaged readers log a failure before raising it; ours is the one-line DataError below."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _caused_by(exc: BaseException, kind: type) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _check_utf8(label: str, path: Path, ds) -> None:
    """pyarrow's JSON reader keeps bytes that are not UTF-8; they would surface later as a UnicodeDecodeError
    deep in a map. A full validation of the Arrow table finds them now (C++ speed)."""
    import pyarrow as pa

    try:
        ds.data.table.validate(full=True)
    except pa.ArrowInvalid as exc:
        if "utf8" in str(exc).lower():
            raise _utf8_error(label, path) from None
        raise DataError(f"{label}: the data read from it is invalid ({exc}). Fix: check the file") from None


def _utf8_error(label: str, path: Path) -> DataError:
    """A DataError naming the first line of `path` that is not UTF-8 (a row for .jsonl and .csv files)."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                problem = f"not UTF-8 text (byte 0x{line[err.start]:02x} at column {err.start + 1})"
                fix = "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)"
                suffix = path.suffix.lower()
                if suffix in (".jsonl", ".csv"):
                    return row_error(label, lineno - (suffix == ".csv"), None, problem, fix)
                return row_error(label, None, None, f"line {lineno} is {problem}", fix)
    return DataError(f"{label}: not UTF-8 text. Fix: save the file as UTF-8")


def _csv_text_features(label: str, path: Path):
    import csv

    from datasets import Features, Value

    with open(path, "rb") as f:
        first = f.readline()
    try:
        header = next(csv.reader([first.decode("utf-8")]), [])
    except UnicodeDecodeError:
        raise _utf8_error(label, path) from None
    return Features({name: Value("string") for name in header})


def _locate_json_error(label: str, path: Path) -> DataError | None:
    """Find the first malformed row of a JSON/JSON-lines file (only run after the fast reader failed)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            return row_error(
                label, None, None, f"invalid JSON at line {err.lineno}: {err.msg}", "fix that line"
            )
        if not rows:
            return DataError(
                f"{label}: the dataset has no rows. Fix: point data.datasets at a non-empty file"
            )
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
        if bad is not None:
            return row_error(
                label, bad + 1, None, "not a JSON object", 'make every row an object {"col": ...}'
            )
        return None
    if not text.strip():
        return DataError(f"{label}: the file has no rows. Fix: point data.datasets at a non-empty file")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            return row_error(label, lineno, None, f"invalid JSON ({err.msg})", "fix or delete that line")
        if not isinstance(row, dict):
            return row_error(
                label, lineno, None, "not a JSON object", 'make every line an object {"col": ...}'
            )
    return None


def _load_arrow_dir(spec: DatasetSpec, path: Path, split: str):
    import datasets

    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        raise DataError(
            f"{spec.path}: a directory but not an Arrow dir written by save_to_disk. "
            "Fix: point at a data file, or save the data with Dataset.save_to_disk"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(
            f"{spec.path}: cannot read the Arrow dir ({exc}). Fix: re-save it with save_to_disk"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{spec.path}: the saved DatasetDict has no split '{split}' (it has {', '.join(loaded)}). "
                f"Fix: add ':split=NAME' to the spec or set data.split"
            )
        return loaded[split]
    return loaded
