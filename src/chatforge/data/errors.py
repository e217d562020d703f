"""The one error type of the data layer: it names the file, the row, the field and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad data spec. The message says where (file, 1-based row, field) and how to fix it."""


def row_error(source: str, row: int | None, field: str | None, problem: str, fix: str) -> DataError:
    """Build a DataError like "data.jsonl, row 3, field 'prompt': <problem>. Fix: <fix>".

    `row` is 1-based (the n-th data row; for .jsonl files the line number, for .csv the line after the header).
    """
    where = [source]
    if row is not None:
        where.append(f"row {row}")
    if field is not None:
        where.append(f"field '{field}'")
    return DataError(f"{', '.join(where)}: {problem}. Fix: {fix}")
