"""Keep a command's output to chatforge's own lines: the libraries' progress bars for local work (reading a
data file, loading or writing weights) and DeepSpeed's notices are off unless CHATFORGE_VERBOSE=1. Warnings
(Python's `warnings`, library loggers at WARNING) stay: they may be about the user's own code or data.

Light on purpose: it runs before any heavy import, and sets environment variables so the processes a
command starts (the steps of `chatforge train`) are as quiet.
"""

from __future__ import annotations

import logging
import os

# DeepSpeed says this once per process on every machine without a GPU; chatforge prints the plan it chose.
DEEPSPEED_NOTICES = ("Setting accelerator to CPU",)
# transformers' bars for work on local files (downloads from the hub keep theirs: they can take minutes).
LOCAL_BARS = ("Loading weights", "Writing model shards")


def verbose() -> bool:
    return os.environ.get("CHATFORGE_VERBOSE") == "1"


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(DEEPSPEED_NOTICES)


def quiet_libraries() -> None:
    """Before heavy imports: datasets' bars off (an explicit HF_DATASETS_DISABLE_PROGRESS_BARS wins), and
    DeepSpeed's CPU-accelerator notice dropped."""
    if verbose():
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    deepspeed = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates at import is this one
    if not any(isinstance(f, _DropNotices) for f in deepspeed.filters):
        deepspeed.addFilter(_DropNotices())


def quiet_transformers() -> None:
    """transformers' 'Loading weights' / 'Writing model shards' bars off (call where transformers is imported
    anyway: it is heavy)."""
    if verbose():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_tqdm_hook(skip_local_bars)


def skip_local_bars(factory, args: tuple, kwargs: dict):
    """transformers' tqdm hook: an empty bar for LOCAL_BARS, the bar it asked for otherwise."""
    if kwargs.get("desc") in LOCAL_BARS:
        from transformers.utils.logging import EmptyTqdm

        return EmptyTqdm(*args, **kwargs)
    return factory(*args, **kwargs)
