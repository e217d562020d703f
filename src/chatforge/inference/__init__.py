"""Use a trained model: `ChatModel` (Python API), the `chatforge chat` REPL and the OpenAI-compatible server.

`create_app` is imported on first use so that `ChatModel` works without the server extras (fastapi).
"""

from __future__ import annotations

from typing import Any

from .chat_model import (
    FALLBACK_CHAT_TEMPLATE,
    ChatInputError,
    ChatModel,
    ChatStream,
    ChatTemplateError,
    Completion,
    ContextLengthError,
    GenerationJob,
    ModelNotFoundError,
)
from .scheduler import BatchScheduler

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "BatchScheduler",
    "ChatInputError",
    "ChatModel",
    "ChatStream",
    "ChatTemplateError",
    "Completion",
    "ContextLengthError",
    "GenerationJob",
    "ModelNotFoundError",
    "create_app",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .server import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
