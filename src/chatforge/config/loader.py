"""Typed config machinery: dataclasses <-> dicts, YAML files, dotted `key=value` overrides.

Every config in chatforge is a nested dataclass. Fields are documented with an attribute docstring
(a string literal right after the field); `describe()` reads those from the source so `--help`
and the docs never drift from the code.
"""

from __future__ import annotations

import ast
import contextvars
import copy
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
# The command's config class while one is being built (for messages about keys that moved).
_ROOT: contextvars.ContextVar[type | None] = contextvars.ContextVar("chatforge_config_root", default=None)


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or out of range; the message names the key."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} does not fit any of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if value is None:  # `key=none` for a setting that is never null is the word itself
            return "none"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: Any = None) -> T:
    """Build dataclass `cls` from a (nested) dict, checking names and types.

    Keys the dict leaves out keep `base`'s values, and a nested section starts from its parent's default
    (SFT's model section defaults to lr 1e-4 though the class says 1e-5; naming one key of it must not
    silently bring back the class defaults of the others)."""
    from .moved import moved_message

    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    root = _ROOT.get()
    if root is None:
        _ROOT.set(cls)
        try:
            return from_dict(cls, data, prefix, base)
        finally:
            _ROOT.set(None)
    for key in unknown:
        moved = moved_message(cls, key, prefix, root)
        if moved:
            raise ConfigError(moved)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    base = base if base is not None else cls()
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if _is_dataclass_type(tp) and isinstance(value, dict):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.", getattr(base, key))
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return dataclasses.replace(base, **kwargs)


def to_dict(obj: Any) -> Any:
    """Plain nested dict of a config (for YAML dumps and run reports)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


# YAML spells null `null` or `~`; on a command line people also write Python's None.
_NONE_WORDS = ("None", "none")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so 3, 1e-5, true, [1,2], null/None work)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. engine.zero_stage=3)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    if raw.strip() in _NONE_WORDS:
        return key.split("."), None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def merge_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply dotted overrides onto a nested dict (in place), creating sub-dicts as needed."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), base: dict | None = None
) -> T:
    """Defaults <- `base` dict <- YAML file <- `key=value` overrides, then validated."""
    import yaml

    # Deep copy: YAML and overrides update nested sections in place, and `base` is the caller's.
    data: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
        deep_update(data, loaded)
    merge_overrides(data, overrides)
    try:
        cfg = from_dict(cls, data)
    except ConfigError as exc:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{exc}{where}") from None
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def deep_update(dst: dict, src: dict) -> dict:
    """Merge nested dict `src` into `dst` in place (sub-dicts merged, other values replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def save_yaml(cfg: Any, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass, read from its source (empty where unavailable)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def describe(
    cls: type, prefix: str = "", defaults: Any = None, hidden: tuple[str, ...] = ()
) -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) for every leaf field of a config class, nested ones included.

    A section's defaults come from its parent's default instance, which may differ from the section
    class's own (SFTConfig's optim has learning_rate=1e-4, OptimConfig's default is 1e-5).
    """
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        if any(key == h or key.startswith(h + ".") for h in hidden):
            continue
        default = _field_default(f) if defaults is None else getattr(defaults, f.name)
        if _is_dataclass_type(tp):
            section = default if isinstance(default, tp) else None
            rows.extend(describe(tp, key + ".", section, hidden))
            continue
        rows.append((prefix + f.name, repr(default), docs.get(f.name, "")))
    return rows


def format_help(cls: type, hidden: tuple[str, ...] = ()) -> str:
    rows = describe(cls, hidden=hidden)
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  {k:<{width}}  {doc} [default: {d}]" for k, d, doc in rows]
    return "\n".join(lines)
