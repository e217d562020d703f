"""One loaded chat model answering conversations: whole replies, text streams and batches.

The model is shared by every caller (REPL, HTTP server threads); `lock` makes decodes run one at a time,
so two of them never share a KV cache or interleave their decoding state. The server batches requests
itself (`BatchScheduler`) and takes the same lock for each batch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chatforge.config.schema import GenerationConfig
from chatforge.generation import StopStrings, generate, stream_generate

from .chat_encoding import ChatEncoder, ControlTokenError
from .reply import Completion, ReplyBuilder
from .text import truncate_at_stop

Message = dict[str, str]
DEFAULT_MAX_NEW_TOKENS = 256

# The DS-Chat prompt format ("\n\nHuman: ...\n\nAssistant:"), for base models whose tokenizer has no template.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
    "{% else %}{{ '\n\nAssistant: ' + message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
)
FALLBACK_STOP = ["\n\nHuman:"]


class ChatInputError(ValueError):
    """A conversation the model cannot answer as given (the caller's fault, e.g. HTTP 400)."""


class ContextLengthError(ChatInputError):
    """Prompt + max_new_tokens do not fit in the model's positions."""


class ChatTemplateError(ValueError):
    """The tokenizer has no chat template."""


class ModelNotFoundError(OSError):
    """`--model` names neither a model dir nor a model loadable from the Hugging Face hub cache."""


@dataclass
class GenerationJob:
    """One reply to generate: the prompt ids and the settings checked against the model."""

    prompt_ids: list[int]
    config: GenerationConfig
    seed: int | None


class ChatStream:
    """Iterator over the text deltas of one reply; `completion` is set once it is exhausted.

    Building it encodes and checks the prompt (errors are raised by `ChatModel.stream_chat` itself);
    generation starts on the first `next()`. `close()` ends generation early and frees the model.
    """

    def __init__(self, model: ChatModel, job: GenerationJob) -> None:
        self.completion: Completion | None = None
        self._tokens = model._stream_tokens(job, self)

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        return next(self._tokens)

    def close(self) -> None:
        self._tokens.close()


class ChatModel:
    """A causal LM + tokenizer loaded from a HF model dir, a peft adapter dir (merged into its base), or a
    Hugging Face hub name (from the local HF cache, or downloaded when online).

    Message content is untrusted by default: control strings typed in it (`<|end|>`, `<|im_start|>`) are
    encoded as plain text (see `chat_encoding`); `trust_content=True` lets them become control tokens.

    Generation options (`**gen` of `chat`, `stream_chat`, `complete`, `complete_batch`):
    max_new_tokens (None: `default_max_new_tokens`, shrunk to fit the context), fit_context (shrink an
    explicit max_new_tokens to fit instead of raising), temperature (0 = greedy), top_p, top_k, do_sample,
    repetition_penalty, stop (str or list of str, left out of the reply), seed.
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        chat_template: str | None = None,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        trust_content: bool = False,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(dtype, self.device)
        local = Path(model_dir).is_dir()
        self.name = Path(model_dir).resolve().name if local else str(model_dir)
        self.model, self.tokenizer = _load(str(model_dir), self.device, self.dtype)
        self.default_stop = _set_chat_template(self.tokenizer, chat_template, str(model_dir))
        self.encoder = ChatEncoder(self.tokenizer)
        self.trust_content = trust_content
        self.default_max_new_tokens = default_max_new_tokens
        self.eos_token_id = _eos_token_id(self.tokenizer, self.model)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.eos_token_id if pad is None else pad
        self.max_positions = _max_positions(self.model.config)
        self.lock = threading.Lock()
        """Held by whoever runs the model (one reply here, or one batch of the server's scheduler)."""

    # --- public API -------------------------------------------------------------------------------------

    def encode(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids: the chat template applied with the assistant's turn opened."""
        try:
            return self.encoder.encode(messages, trust_content=self.trust_content)
        except ControlTokenError as exc:
            raise ChatInputError(str(exc)) from exc
        except Exception as exc:  # jinja raises its own errors, e.g. for role orders a template forbids
            raise ChatInputError(f"the chat template rejected the messages: {exc}") from exc

    def chat(self, messages: Sequence[Message], **gen: Any) -> str:
        """The assistant's reply to `messages` (list of {'role', 'content'})."""
        return self.complete(messages, **gen).text

    def complete(self, messages: Sequence[Message], **gen: Any) -> Completion:
        """Like `chat`, with the finish reason and token counts."""
        stream = self.stream_chat(messages, **gen)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def stream_chat(self, messages: Sequence[Message], **gen: Any) -> ChatStream:
        """Text deltas of the reply as they are generated; ''.join(deltas) == chat(...) for the same seed."""
        return ChatStream(self, self.prepare(messages, **gen))

    def prepare(self, messages: Sequence[Message], **gen: Any) -> GenerationJob:
        """Encode and check a conversation and its options (ChatInputError, ContextLengthError)."""
        ids = self.encode(messages)
        return self._job(ids, len(ids), **gen)

    def new_reply(self, job: GenerationJob) -> ReplyBuilder:
        """The object that turns `job`'s generated ids into text and a Completion."""
        return ReplyBuilder(self.tokenizer, self.eos_token_id, job.config, len(job.prompt_ids))

    def complete_batch(self, conversations: Sequence[Sequence[Message]], **gen: Any) -> list[Completion]:
        """Replies to several conversations in one left-padded batch (faster than one by one)."""
        prompts = [self.encode(m) for m in conversations]
        job = self._job([], max(len(p) for p in prompts), **gen)
        input_ids, attention_mask = self.left_pad(prompts)
        with self.lock:
            out = generate(
                self.model, input_ids, attention_mask, job.config,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                stop_checker=self._stop_checker(job.config), generator=self.seeded_generator(job.seed),
            )  # fmt: skip
        responses = out.sequences[:, input_ids.shape[1] :]
        return [
            self._batch_row(prompts[i], responses[i], out.response_mask[i], bool(out.finished[i]), job.config)
            for i in range(len(prompts))
        ]

    # --- internals --------------------------------------------------------------------------------------

    def _job(
        self,
        prompt_ids: list[int],
        prompt_len: int,
        *,
        max_new_tokens: int | None = None,
        fit_context: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        repetition_penalty: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> GenerationJob:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        config = GenerationConfig(
            max_new_tokens=self._max_new_tokens(prompt_len, max_new_tokens, fit_context),
            do_sample=do_sample and temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=top_p,
            top_k=top_k,
            stop_strings=[s for s in stops + self.default_stop if s],
            repetition_penalty=repetition_penalty,
        )
        config.validate()
        return GenerationJob(prompt_ids, config, seed)

    def _max_new_tokens(self, prompt_len: int, requested: int | None, fit_context: bool) -> int:
        room = None if self.max_positions is None else self.max_positions - prompt_len
        if room is not None and room < 1:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens but the model reads at most {self.max_positions}: "
                "shorten the conversation (drop early turns)"
            )
        if requested is None:
            return self.default_max_new_tokens if room is None else min(self.default_max_new_tokens, room)
        if room is not None and requested > room:
            if fit_context:
                return room
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens and max_new_tokens is {requested}, but the model reads "
                f"at most {self.max_positions} positions: lower max_new_tokens to {room} or shorten the prompt"
            )
        return requested

    def _stop_checker(self, config: GenerationConfig) -> StopStrings | None:
        return StopStrings(self.tokenizer, config.stop_strings) if config.stop_strings else None

    def seeded_generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(seed)

    def _stream_tokens(self, job: GenerationJob, out: ChatStream) -> Iterator[str]:
        reply = self.new_reply(job)
        input_ids = torch.tensor([job.prompt_ids], device=self.device)
        # The lock is held across yields: a second caller waits until this reply is done or closed.
        with self.lock:
            tokens = stream_generate(
                self.model, input_ids, torch.ones_like(input_ids), job.config,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                stop_checker=self._stop_checker(job.config), generator=self.seeded_generator(job.seed),
            )  # fmt: skip
            try:
                for token in tokens:
                    delta = reply.push(token)
                    if delta:
                        yield delta
                    if reply.done:
                        break
            finally:
                tokens.close()  # type: ignore[attr-defined]
        tail, out.completion = reply.finish()
        if tail:
            yield tail

    def left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both `(B, P)` with P the longest prompt, pads on the left."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p)
            attention_mask[i, width - len(p) :] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _batch_row(
        self,
        prompt: list[int],
        response: torch.Tensor,
        mask: torch.Tensor,
        finished: bool,
        config: GenerationConfig,
    ) -> Completion:
        ids = response[mask.bool()].tolist()
        text = self.tokenizer.decode([t for t in ids if t != self.eos_token_id], skip_special_tokens=True)
        text, hit_stop = truncate_at_stop(text, config.stop_strings)
        reason = "stop" if finished or hit_stop or len(ids) < config.max_new_tokens else "length"
        return Completion(text, reason, len(prompt), len(ids))


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # bf16 is ~12x slower than fp32 on CPUs without bf16 instructions (see STACK-NOTES).
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    names.update({"fp16": torch.float16, "float16": torch.float16})
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(names)} or 'auto'")
    return names[dtype]


def _load(model_dir: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer); a peft adapter dir is loaded on its base and merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        return _load_from_hub(model_dir, device, dtype)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model dir (no config.json or adapter_config.json)")
    tokenizer_dir = model_dir
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        # Merged weights make generation as fast as a plain model (no extra LoRA matmuls per token).
        model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
        if not (path / "tokenizer_config.json").is_file():
            tokenizer_dir = base
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model.to(device).eval(), tokenizer


def _load_from_hub(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """A hub model by name ('ORG/NAME'), from the HF cache or the network; one-line errors otherwise."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(name).exists():
        raise ModelNotFoundError(f"{name} is a file, not a model dir")
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ModelNotFoundError(f"{name}: no such model dir (nor a valid hub model name)") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise ModelNotFoundError(f"{name}: no such model dir, and {_hub_failure(name, exc)}") from exc
    return model.to(device).eval(), tokenizer


def _hub_failure(name: str, exc: OSError) -> str:
    """Why a hub name did not load, in one line (transformers' own message spans several)."""
    import os

    from huggingface_hub import constants, try_to_load_from_cache

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        return (
            f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: "
            f"download it first (`hf download {name}`) or unset HF_HUB_OFFLINE"
        )
    lines = str(exc).strip().splitlines()
    return f"the hub model could not be loaded: {lines[0] if lines else type(exc).__name__}"


def _set_chat_template(tokenizer: Any, chat_template: str | None, model_dir: str) -> list[str]:
    """Install the requested template; returns the stop strings it needs (the fallback's next 'Human:')."""
    if chat_template == "fallback":
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        return list(FALLBACK_STOP)
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the tokenizer in {model_dir} has no chat template; pass one (a Jinja file with "
            "`--chat-template FILE`, or ChatModel(..., chat_template=...)), or use `--chat-template fallback` "
            "for the DS-Chat format '\\n\\nHuman: ...\\n\\nAssistant:'"
        )
    return []


def _eos_token_id(tokenizer: Any, model: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ValueError("neither the tokenizer nor the model defines an EOS token; replies could never end")
    return int(eos)


def _max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
