"""Generation backends: one contract for the native loop (default, everywhere) and vLLM (optional, CUDA).

B = batch, P = (left-padded) prompt length, A = generated length.

Contract (`GenerationBackend`), the same for every backend and checked by tests/generation/test_backends.py:

- `generate(input_ids, attention_mask, config, generator=None) -> GenerationOutput` takes LEFT-padded
  prompts `(B, P)` and returns `sequences (B, P + A)` starting with the prompts exactly as given, then the
  responses; `response_mask (B, A)` is 1 for each generated token up to and including the stop token
  (EOS or the token completing a stop string), 0 after; masked positions hold the pad id and log-prob 0;
  `logprobs (B, A)` = log_softmax(logits / T)[token] of the raw logits (before repetition penalty and
  top-k/top-p; T = 1 when greedy with temperature <= 0); `finished (B,)` is True for rows that stopped
  (False: hit max_new_tokens, so their mask is all ones); A <= config.max_new_tokens. Draws use only
  `generator`: equal seeds give equal outputs.
- `load_weights(named_tensors)` takes `(name, tensor)` pairs with the names of the HF causal LM's
  `state_dict()` (unwrapped, LoRA merged) and makes every later `generate` use them. Call it after each
  optimizer step (or each iteration) whose weights the next rollout must see.
- `close()` frees the backend's resources; later calls raise RuntimeError. Backends are context managers.
"""

from __future__ import annotations

import gc
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from chatforge.config.schema import GenerationConfig

from .engine import COMPACT_THRESHOLD, GenerationOutput, generate
from .stopping import StopStrings

NamedTensors = Iterable[tuple[str, Tensor]]


class GenerationBackend(ABC):
    """Prompts in, `GenerationOutput` out; weights synced by `load_weights`. See the module docstring."""

    _closed = False

    @abstractmethod
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        config: GenerationConfig,
        generator: torch.Generator | None = None,
    ) -> GenerationOutput: ...

    @abstractmethod
    def load_weights(self, named_tensors: NamedTensors) -> None: ...

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} was closed; build a new backend")

    def __enter__(self) -> GenerationBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ModelSource = nn.Module | Callable[[], AbstractContextManager[nn.Module]]


class NativeBackend(GenerationBackend):
    """chatforge's own KV-cache loop (`chatforge.generation.generate`) on a torch module.

    `model` is the causal LM, or a zero-argument callable returning a context manager that yields it for
    the duration of one call (e.g. `lambda: inference_mode(engine.actor)` to gather ZeRO-3 shards and
    merge LoRA per rollout). `tokenizer` is only needed for `config.stop_strings`.
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        tokenizer: Any = None,
        compact_threshold: float = COMPACT_THRESHOLD,
    ) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tokenizer = tokenizer
        self.compact_threshold = compact_threshold

    def _model_context(self) -> AbstractContextManager[nn.Module]:
        return nullcontext(self.model) if isinstance(self.model, nn.Module) else self.model()

    def generate(self, input_ids, attention_mask, config, generator=None) -> GenerationOutput:
        self._check_open()
        stop_checker = None
        if config.stop_strings and self.tokenizer is not None:
            stop_checker = StopStrings(self.tokenizer, config.stop_strings)
        with self._model_context() as model:
            return generate(
                model,
                input_ids,
                attention_mask,
                config,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                stop_checker=stop_checker,
                generator=generator,
                compact_threshold=self.compact_threshold,
            )

    def load_weights(self, named_tensors: NamedTensors) -> None:
        """Copy each tensor into the module's parameter or buffer of that name (a no-op when they share).

        Unknown names or shapes are an error: a silently skipped tensor would leave stale weights.
        """
        self._check_open()
        with self._model_context() as model, torch.no_grad():
            # remove_duplicate=False: tied weights (lm_head.weight) keep their own name, as in state_dict().
            own = dict(model.named_parameters(remove_duplicate=False)) | dict(
                model.named_buffers(remove_duplicate=False)
            )
            for name, tensor in named_tensors:
                if name not in own:
                    raise KeyError(
                        f"NativeBackend.load_weights: the model has no parameter or buffer {name!r}"
                    )
                target = own[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"NativeBackend.load_weights: {name} has shape {tuple(target.shape)}, got {tuple(tensor.shape)}"
                    )
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)

    def close(self) -> None:
        self.model = None
        super().close()


def pack_responses(
    input_ids: Tensor,
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    finished: Sequence[bool],
    pad_token_id: int,
) -> GenerationOutput:
    """A `GenerationOutput` from per-row response ids (stop token included), their log-probs and stop flags.

    input_ids: `(B, P)` as given to the backend. Rows are right-padded with pad / log-prob 0 to the longest.
    """
    width = max((len(r) for r in responses), default=0)
    batch = input_ids.shape[0]
    tokens = torch.full((batch, width), pad_token_id, dtype=input_ids.dtype)
    mask = torch.zeros(batch, width, dtype=torch.long)
    values = torch.zeros(batch, width, dtype=torch.float32)
    for row, (ids, lps) in enumerate(zip(responses, logprobs, strict=True)):
        if len(ids) != len(lps):
            raise ValueError(f"pack_responses: row {row} has {len(ids)} tokens but {len(lps)} log-probs")
        tokens[row, : len(ids)] = torch.tensor(list(ids), dtype=input_ids.dtype)
        values[row, : len(ids)] = torch.tensor(list(lps), dtype=torch.float32)
        mask[row, : len(ids)] = 1
    device = input_ids.device
    return GenerationOutput(
        sequences=torch.cat([input_ids, tokens.to(device)], dim=1),
        response_mask=mask.to(device),
        logprobs=values.to(device),
        finished=torch.tensor(list(finished), dtype=torch.bool, device=device),
    )


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(
            "the 'vllm' generation backend needs vLLM (CUDA only): pip install 'chatforge[vllm]', "
            "or use the default native backend"
        ) from err
    return vllm


class VLLMBackend(GenerationBackend):
    """vLLM's offline `LLM` engine in this process, for GPU rollouts.

    `model` is a HF model directory or hub id (the weights vLLM starts from); later weights arrive by
    `load_weights`, which runs the vLLM model's own `load_weights` in the worker through `LLM.apply_model`.
    vLLM's engine core is kept in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 unless set) so the
    tensors are handed over by reference, not pickled. Log-probs are vLLM's `raw_logprobs`
    (log_softmax of the unprocessed logits), which equal the contract's only at temperature 1.
    """

    def __init__(
        self,
        model: str,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.vllm = _import_vllm()
        self.eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad_token_id = pad_token_id
        self.llm = self.vllm.LLM(
            model=model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            logprobs_mode="raw_logprobs",
            **llm_kwargs,
        )

    def _sampling_params(self, config: GenerationConfig, seed: int):
        effective_temperature = config.temperature if config.temperature > 0 else 1.0
        if effective_temperature != 1.0:
            raise ValueError(
                f"VLLMBackend: generation.temperature={config.temperature} but vLLM reports log-probs of the "
                "untempered logits, while GenerationOutput.logprobs must be log_softmax(logits / T); "
                "use temperature 1.0 with vLLM, or the native backend"
            )
        return self.vllm.SamplingParams(
            n=1,
            max_tokens=config.max_new_tokens,
            temperature=1.0 if config.do_sample else 0.0,
            top_k=config.top_k if config.top_k > 0 else -1,
            top_p=config.top_p,
            repetition_penalty=config.repetition_penalty,
            stop_token_ids=self.eos_ids,
            stop=list(config.stop_strings) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the chosen token's only
            seed=seed,
        )

    def generate(self, input_ids, attention_mask, config, generator=None) -> GenerationOutput:
        self._check_open()
        config.validate()
        batch = input_ids.shape[0]
        # One seed per row from `generator`, so equal generators give equal requests.
        base = int(torch.randint(0, 2**62, (1,), generator=generator, device=_device_of(generator)).item())
        params = [self._sampling_params(config, base + row) for row in range(batch)]
        prompts = [
            self.vllm.TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
            for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())
        ]
        results = self.llm.generate(prompts, params, use_tqdm=False)
        completions = [result.outputs[0] for result in results]
        responses = [list(c.token_ids) for c in completions]
        logprobs = [
            [step[token].logprob for step, token in zip(c.logprobs, c.token_ids)] for c in completions
        ]
        finished = [c.finish_reason == "stop" for c in completions]
        return pack_responses(input_ids, responses, logprobs, finished, self.pad_token_id)

    def load_weights(self, named_tensors: NamedTensors) -> None:
        self._check_open()
        weights = list(named_tensors)
        self.llm.apply_model(lambda model: model.load_weights(weights))
        # Cached prompt KV blocks were computed with the old weights.
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        if not self._closed:
            del self.llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        super().close()


def _device_of(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


BACKENDS: dict[str, type[GenerationBackend]] = {"native": NativeBackend, "vllm": VLLMBackend}


def build_backend(name: str, *args: Any, **kwargs: Any) -> GenerationBackend:
    """`build_backend("native", model, eos_token_id=..., pad_token_id=...)` or `("vllm", model_dir, ...)`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown generation backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name](*args, **kwargs)
