"""Rule rewards: user Python functions `f(prompts, responses, **row_fields) -> scores`, loaded from
'module:function' (or 'module:function*weight') and checked on every call.

`prompts[i]` is the text of the last user message before response i; `row_fields` holds, as lists aligned
with the prompts, every other scalar column of the source rows (e.g. a reference `answer`), `messages`
(the whole prompt conversation as {role, content} dicts) and `finished` (the response ended with an
end-of-turn token or stop string, not at the length limit).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatforge.config import ConfigError


class RewardFunctionError(ValueError):
    """A reward function returned something that is not one finite number per response."""


@dataclass(frozen=True)
class RewardFunction:
    name: str
    fn: Callable
    weight: float = 1.0

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], fields: dict[str, list]
    ) -> list[float]:
        kwargs = fields if _takes_kwargs(self.fn) else {k: v for k, v in fields.items() if _takes(self.fn, k)}
        try:
            out = self.fn(list(prompts), list(responses), **kwargs)
        except Exception as exc:
            raise RewardFunctionError(
                f"reward function {self.name} raised {type(exc).__name__}: {exc}"
            ) from exc
        return check_scores(out, len(responses), self.name)


def split_weight(spec: str) -> tuple[str, float]:
    """'x*0.5' -> ('x', 0.5); 'x' -> ('x', 1.0)."""
    head, sep, tail = spec.rpartition("*")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def load_function(spec: str, setting: str) -> RewardFunction:
    """Import 'module:function[*weight]', with an error that names the setting."""
    path, weight = split_weight(spec)
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{setting}: {spec!r} is not 'package.module:function' (optionally '*weight')")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{setting}: {path!r} cannot be imported ({exc}); use 'package.module:function'"
        ) from None
    if not callable(fn):
        raise ConfigError(f"{setting}: {path!r} is not a function")
    return RewardFunction(path, fn, weight)


def check_scores(out, n: int, name: str) -> list[float]:
    """One finite number (or bool) per response, or a RewardFunctionError naming the function."""
    if hasattr(out, "tolist"):
        out = out.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name} returned {type(out).__name__}; it must return one number per response "
            f"(a list of {n})"
        )
    if len(out) != n:
        raise RewardFunctionError(f"reward function {name} returned {len(out)} scores for {n} responses")
    scores = []
    for i, value in enumerate(out):
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(
                f"reward function {name} returned {value!r} for response {i}; scores must be finite numbers"
            )
        scores.append(float(value))
    return scores


def _takes_kwargs(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind == p.VAR_KEYWORD for p in params)


def _takes(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
