"""Parse dataset specs: `name_or_path[:weight][:option]...`.

Only *trailing* colon-separated items that parse as a weight or a known option are split off, so
POSIX paths that contain colons stay intact; a spec that names an existing path is never split.

Options: `sft` (SFT-only: every row goes to step 1), `prompts` (prompts-only: every row goes to
step 3), `split=NAME` (hub or DatasetDict split), `format=NAME` (force a row format).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import DataError

ROLES = ("all", "sft", "prompts")
_FLAG_ROLES = {"sft": "sft", "sft_only": "sft", "prompts": "prompts", "prompts_only": "prompts"}
_KEY_OPTIONS = ("split", "format")


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of `data.datasets`."""

    path: str
    """Hub name, local file or Arrow dir."""
    weight: float = 1.0
    """Sampling multiplier of the dataset's training rows (2 = each row twice, 0.5 = half the rows)."""
    role: str = "all"
    """'all' (split over steps 1/2/3 by data_split), 'sft' (step 1 only) or 'prompts' (step 3 only)."""
    split: str | None = None
    """Split to read from a hub dataset or a saved DatasetDict; None = data.split."""
    format: str | None = None
    """Row format for this dataset; None = data.format."""

    @property
    def name(self) -> str:
        """Short label for stats and messages."""
        return self.path if self.split is None else f"{self.path}[{self.split}]"


def _parse_weight(item: str) -> float | None:
    try:
        value = float(item)
    except ValueError:
        return None
    return value if item.strip() == item and item else None


def _apply_item(item: str, fields: dict) -> bool:
    """Record one trailing item in `fields`; False when it is not a weight or option (part of the path)."""
    weight = _parse_weight(item)
    if weight is not None and "weight" not in fields:
        fields["weight"] = weight
        return True
    if item in _FLAG_ROLES and "role" not in fields:
        fields["role"] = _FLAG_ROLES[item]
        return True
    key, sep, value = item.partition("=")
    if sep and key in _KEY_OPTIONS and value and key not in fields:
        fields[key] = value
        return True
    return False


def parse_spec(text: str) -> DatasetSpec:
    """`'data/a:b.jsonl:2:sft'` -> DatasetSpec(path='data/a:b.jsonl', weight=2.0, role='sft')."""
    text = text.strip()
    if not text:
        raise DataError("data.datasets: an empty dataset spec. Fix: give 'name_or_path[:weight]'")
    if os.path.exists(text):
        return DatasetSpec(path=text)
    fields: dict = {}
    head = text
    while ":" in head:
        rest, _, item = head.rpartition(":")
        if not rest or not _apply_item(item, fields):
            break
        head = rest
    spec = DatasetSpec(path=head, **fields)
    if not (math.isfinite(spec.weight) and spec.weight > 0):
        raise DataError(
            f"data.datasets: spec '{text}' has weight {spec.weight}. "
            "Fix: use a weight > 0 (drop the dataset to exclude it)"
        )
    return spec
