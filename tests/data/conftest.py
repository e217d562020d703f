"""Writers for small fixture files in every supported container, and a data-settings factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def write_rows(path: Path, rows: list[dict]) -> str:
    """Write rows to `path`; the container follows the suffix (.json, .jsonl, .parquet, .csv, or a dir = Arrow)."""
    import datasets
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def numbered_rows(n: int, tag: str = "q") -> list[dict]:
    """TRL standard rows whose prompts are unique ('q17'), so a row is recognisable after tokenising."""
    return [
        {"prompt": f"{tag}{i}", "completion": f"a{i}", "chosen": f"a{i}", "rejected": f"b{i}"}
        for i in range(n)
    ]


@pytest.fixture
def make_cfg(tmp_path):
    """DataSettings (what the data layer reads from any step's data config) with a per-test cache."""
    from chatforge.data.pipeline import DataSettings

    def make(datasets: list[str], **kw) -> DataSettings:
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataSettings.of(None, datasets=datasets, **kw)

    return make
