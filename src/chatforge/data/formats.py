"""Format adapters: every source row becomes one unified row.

Unified row (an Arrow struct, see UNIFIED_FEATURES):
    prompt, completion, chosen, rejected: list of {"role", "content"} messages ([] when absent)
    text: str ("" when absent; the plain-text rows of the pretraining mix)
    extra: str (JSON of the row's other scalar columns, e.g. a reference answer for reward functions)
    row: int (1-based row number in the source, for error messages)

One table drives every format: FORMATS maps each source column to (unified field, parser, default
role). Two generic rules finish the row: a full conversation is split at its last assistant turn
(prompt = the turns before it), and chosen/rejected full conversations give the prompt as their
shared prefix (Anthropic hh-rlhf, TRL implicit-prompt preference data).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import DataError, row_error

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_FIELDS = ("prompt", "completion", "chosen", "rejected")
_TURN = re.compile(r"(?:^|\n\n)[ \t]*(Human|Assistant|System):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


class RowProblem(Exception):
    """Raised by parsers; turned into a DataError that names the file and row."""

    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(problem)
        self.field, self.problem, self.fix = field, problem, fix


@dataclass(frozen=True)
class Format:
    """A row format: source column -> (unified field, parser name, default role for plain strings)."""

    columns: dict[str, tuple[str, str, str | None]]
    required: tuple[tuple[str, ...], ...]
    """Alternatives: the source must have every column of at least one of them."""
    description: str = ""


_CHAT_COLUMNS = {
    "prompt": ("prompt", "chat", "user"),
    "messages": ("conversation", "chat", None),
    "completion": ("completion", "chat", "assistant"),
    "response": ("completion", "chat", "assistant"),
    "chosen": ("chosen", "chat", "assistant"),
    "rejected": ("rejected", "chat", "assistant"),
}

FORMATS: dict[str, Format] = {
    "dschat": Format(
        {
            **{col: (target, "chat_stripped", role) for col, (target, _, role) in _CHAT_COLUMNS.items()},
            "prompt": ("prompt", "transcript", None),
        },
        (("prompt",),),
        "DS-Chat / Dahoas rm-static: prompt is a '\\n\\nHuman: ... \\n\\nAssistant:' transcript; "
        "response/chosen/rejected are reply strings",
    ),
    "hh": Format(
        {"chosen": ("chosen", "transcript_full", None), "rejected": ("rejected", "transcript_full", None)},
        (("chosen", "rejected"),),
        "Anthropic hh-rlhf: chosen/rejected full transcripts; prompt = shared prefix before the last Assistant turn",
    ),
    "conversational": Format(
        _CHAT_COLUMNS,
        (("messages",), ("prompt",), ("chosen", "rejected")),
        "TRL conversational / UltraFeedback-binarized: messages, or prompt/completion/chosen/rejected message lists",
    ),
    "standard": Format(
        _CHAT_COLUMNS,
        (("prompt",),),
        "TRL standard: prompt (user text) with completion/response or chosen/rejected reply strings, or prompt-only",
    ),
    "text": Format(
        {"text": ("text", "text", None)}, (("text",),), "plain text for the pretraining mix (PTX)"
    ),
}


def detect_format(columns: list[str], first_row: dict, source: str) -> str:
    """Pick a format from the column names and the first row's value types."""
    cols = set(columns)
    if "messages" in cols or any(isinstance(first_row.get(c), list) for c in MESSAGE_FIELDS):
        return "conversational"
    if "prompt" in cols:
        prompt = first_row.get("prompt")
        return "dschat" if isinstance(prompt, str) and _TURN.search(prompt) else "standard"
    if {"chosen", "rejected"} <= cols:
        return "hh"
    if "text" in cols:
        return "text"
    raise DataError(
        f"{source}: cannot detect the row format from the columns {sorted(cols)}. "
        "Fix: rename columns with data.columns (e.g. {question: prompt, answer: completion}) "
        f"or add ':format=NAME' to the dataset spec, NAME one of {', '.join(FORMATS)}"
    )


def check_columns(fmt_name: str, columns: list[str], source: str) -> Format:
    """Return the Format, or a DataError naming the missing column(s)."""
    if fmt_name not in FORMATS:
        raise DataError(
            f"{source}: unknown format '{fmt_name}'. Fix: use 'auto' or one of {', '.join(FORMATS)}"
        )
    fmt = FORMATS[fmt_name]
    if not any(set(alt) <= set(columns) for alt in fmt.required):
        need = " or ".join("+".join(alt) for alt in fmt.required)
        raise DataError(
            f"{source}: format '{fmt_name}' needs the column(s) {need}, but the file has {sorted(columns)}. "
            "Fix: rename columns with data.columns, or pick another format"
        )
    return fmt


def parse_transcript(text: str, column: str, open_turn: bool) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [user 'hi', assistant 'hello']. With `open_turn`
    (DS-Chat prompts end with '\\n\\nAssistant:') a trailing empty Assistant turn is dropped."""
    parts = _TURN.split(text)
    if len(parts) < 3:
        raise RowProblem(
            column,
            "no 'Human:'/'Assistant:' turn found",
            "write it as '\\n\\nHuman: ...\\n\\nAssistant: ...'",
        )
    if parts[0].strip():
        raise RowProblem(
            column, f"text before the first turn: {parts[0][:40]!r}", "start it with '\\n\\nHuman:'"
        )
    msgs = [
        {"role": _TRANSCRIPT_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]
    if open_turn and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"] and len(msgs) > 1:
        msgs.pop()
    return msgs


def parse_messages(value, column: str, default_role: str | None) -> list[dict]:
    """A string (as one message of `default_role`) or a list of {role, content} dicts."""
    if isinstance(value, str) and default_role is not None:
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        want = "a string or a list of messages" if default_role else "a list of {role, content} messages"
        raise RowProblem(column, f"expected {want}, got {type(value).__name__}", f"make '{column}' {want}")
    if not value:
        raise RowProblem(column, "an empty message list", "give at least one message, or null for none")
    return [_check_message(m, f"{column}[{i}]") for i, m in enumerate(value)]


def _check_message(msg, where: str) -> dict:
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
        raise RowProblem(
            where,
            f"not a {{role, content}} message: {str(msg)[:60]}",
            "give each message 'role' and 'content'",
        )
    if msg["role"] not in ROLES:
        raise RowProblem(f"{where}.role", f"unknown role {msg['role']!r}", f"use one of {', '.join(ROLES)}")
    if not isinstance(msg["content"], str):
        got = type(msg["content"]).__name__
        raise RowProblem(f"{where}.content", f"expected a string, got {got}", "make the content plain text")
    return {"role": msg["role"], "content": msg["content"]}


def _parse_value(value, column: str, parser: str, role: str | None):
    if parser == "text":
        if not isinstance(value, str):
            raise RowProblem(column, f"expected a string, got {type(value).__name__}", "make it plain text")
        return value
    if parser.startswith("transcript"):
        if not isinstance(value, str):
            raise RowProblem(
                column, f"expected a transcript string, got {type(value).__name__}", "make it a string"
            )
        return parse_transcript(value, column, open_turn=parser == "transcript")
    if parser == "chat_stripped" and isinstance(value, str):
        value = value.strip()  # DS-Chat replies start with the space that followed "Assistant:"
    return parse_messages(value, column, role)


def split_last_turn(msgs: list[dict], column: str) -> tuple[list[dict], list[dict]]:
    """(turns before the last assistant message, [last assistant message]); needs an assistant ending."""
    if msgs[-1]["role"] != "assistant":
        raise RowProblem(
            column,
            "the conversation does not end with an assistant message",
            "end it with the assistant reply",
        )
    return msgs[:-1], msgs[-1:]


def _finish(parsed: dict, columns: dict) -> dict:
    """Apply the two generic rules (see module docstring) and fill absent fields."""
    row = {"prompt": [], "completion": [], "chosen": [], "rejected": [], "text": ""}
    conversation = parsed.pop("conversation", None)
    row.update(parsed)
    if conversation is not None:
        if conversation[-1]["role"] == "assistant":
            row["prompt"], row["completion"] = conversation[:-1], conversation[-1:]
        else:
            row["prompt"] = conversation
    pair = [row["chosen"], row["rejected"]]
    if all(pair) and any(m["role"] != "assistant" for m in pair[0] + pair[1]):
        (p_chosen, row["chosen"]), (p_rejected, row["rejected"]) = (
            split_last_turn(pair[0], columns["chosen"]),
            split_last_turn(pair[1], columns["rejected"]),
        )
        if p_chosen != p_rejected:
            raise RowProblem(
                columns["chosen"],
                "chosen and rejected continue different conversations",
                "give both the same turns before the last reply",
            )
        row["prompt"] = p_chosen
    return row


def normalise_row(raw: dict, fmt: Format) -> dict:
    """One source row -> one unified row (without 'row'). Raises RowProblem."""
    parsed, origin = {}, {}
    for column, (target, parser, role) in fmt.columns.items():
        value = raw.get(column)
        if value is None or target in parsed:
            continue
        parsed[target] = _parse_value(value, column, parser, role)
        origin[target] = column
    row = _finish(parsed, {**{"chosen": "chosen", "rejected": "rejected"}, **origin})
    extra = {k: v for k, v in raw.items() if k not in fmt.columns and isinstance(v, (str, int, float, bool))}
    row["extra"] = json.dumps(extra, ensure_ascii=False, sort_keys=True)
    return row


def check_row_shape(raw: dict, file_format: str, source: str, index: int) -> None:
    """A row must have the shape of the format detected from the file's first row: one file, one format
    (otherwise the minority rows would be read with the wrong adapter)."""
    present = [k for k, v in raw.items() if v is not None]
    try:
        shape = detect_format(present, raw, source)
    except DataError:
        shape = None
    if shape != file_format:
        raise row_error(
            source, index + 1, None,
            f"this row looks like format '{shape or 'unknown'}' (columns {sorted(present)}), but the file "
            f"was detected as '{file_format}' from its first row",
            "keep one format per file (split it), or set ':format=NAME' on the dataset spec",
        )  # fmt: skip


def check_row_shapes(raw, file_format: str, source: str) -> None:
    """`check_row_shape` on the first row of each pattern of present columns: one vectorised pass over
    the Arrow table instead of a Python loop, so a row of another shape fails before anything is tokenised
    (a row whose columns fit but whose content does not is still caught row by row when normalising)."""
    import numpy as np
    import pyarrow.compute as pc

    table = raw.data.table
    signature = np.zeros(table.num_rows, dtype=np.int64)
    for bit, name in enumerate(table.column_names[:62]):
        present = pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)
        signature |= present.astype(np.int64) << bit
    _, first_rows = np.unique(signature, return_index=True)
    for index in sorted(int(i) for i in first_rows):
        check_row_shape(raw[index], file_format, source, index)


def make_normaliser(fmt: Format, source: str, detected: str | None = None):
    """A batched `Dataset.map` function: source columns -> unified columns (with_indices=True).

    `detected`: the format name when it was detected from the first row (then every row is checked)."""

    def normalise(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {k: [] for k in (*MESSAGE_FIELDS, "text", "extra", "row")}
        for i, index in enumerate(indices):
            raw = {col: values[i] for col, values in batch.items()}
            if detected is not None:
                check_row_shape(raw, detected, source, index)
            try:
                row = normalise_row(raw, fmt)
            except RowProblem as err:
                raise row_error(source, index + 1, err.field, err.problem, err.fix) from None
            row["row"] = index + 1
            for key, value in row.items():
                out[key].append(value)
        return out

    return normalise


def unified_features():
    """Arrow schema of unified rows (explicit, so columns absent from a source still type-check)."""
    from datasets import Features, List, Value

    message = {"role": Value("string"), "content": Value("string")}
    return Features(
        {
            **{name: List(message) for name in MESSAGE_FIELDS},
            "text": Value("string"),
            "extra": Value("string"),
            "row": Value("int64"),
        }
    )
