"""Fast batched sampling with a KV cache for any Hugging Face causal LM (token ids in, token ids out)."""

from .backends import GenerationBackend, NativeBackend, VLLMBackend, build_backend
from .engine import GenerationOutput, generate, stream_generate
from .sampling import apply_repetition_penalty, filter_top_k, filter_top_p, select_next_tokens
from .stopping import StopStrings

__all__ = [
    "GenerationBackend",
    "GenerationOutput",
    "NativeBackend",
    "StopStrings",
    "VLLMBackend",
    "apply_repetition_penalty",
    "build_backend",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "select_next_tokens",
    "stream_generate",
]
