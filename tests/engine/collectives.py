"""A test instrument: count the collectives DeepSpeed issues (so tests assert on calls, not on time)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

# The deepspeed.comm backend methods that move parameters or gradients between ranks.
_COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_base",
    "all_gather_coalesced",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the collectives DeepSpeed issues while active: `{method name: calls}`.

    Wraps the methods of DeepSpeed's communication backend instance, which ZeRO-3's parameter
    gathering goes through, so a test can assert on calls rather than on time.
    """
    from deepspeed.comm import comm as ds_comm

    counts: Counter = Counter()
    backend = ds_comm.cdb
    originals = {name: getattr(backend, name) for name in _COLLECTIVES if hasattr(backend, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(backend, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(backend, name, fn)  # restores an outer counter's wrapper when nested
