"""The GenerationBackend contract, run through the same tests on every backend we can build here.

`native` is chatforge's loop on a fixture model; `scripted` is a deterministic fake written against the
contract; `vllm-adapter` is VLLMBackend's own code driving a fake in-memory vLLM engine (request
building, output packing, weight sync). The real vLLM engine is tested at the end, on CUDA only.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from chatforge.config.schema import GenerationConfig
from chatforge.generation import GenerationBackend, NativeBackend, VLLMBackend, build_backend, generate
from chatforge.generation.backends import pack_responses

KINDS = ["native", "scripted", "vllm-adapter"]
PAD = 0
VOCAB = 512  # the fixture tokenizer's


class ScriptedBackend(GenerationBackend):
    """Next token = table[previous token]; one weight, `table` (V,) long, replaced by load_weights."""

    def __init__(self, table: torch.Tensor, eos_token_id: int, pad_token_id: int) -> None:
        self.table = table.clone()
        self.eos, self.pad = eos_token_id, pad_token_id

    def generate(self, input_ids, attention_mask, config, generator=None):
        self._check_open()
        config.validate()
        responses, finished = [], []
        for row in input_ids.tolist():
            ids, token = [], row[-1]
            while len(ids) < config.max_new_tokens and (not ids or ids[-1] != self.eos):
                token = int(self.table[token])
                ids.append(token)
            responses.append(ids)
            finished.append(ids[-1] == self.eos)
        logprobs = [[0.0] * len(ids) for ids in responses]  # deterministic: log 1
        return pack_responses(input_ids, responses, logprobs, finished, self.pad)

    def load_weights(self, named_tensors):
        self._check_open()
        for name, tensor in named_tensors:
            if name != "table":
                raise KeyError(name)
            self.table = tensor.clone()


class FakeEngineModel:
    """The 'vLLM model' inside the fake engine: next token = (previous + shift) % VOCAB, EOS when it hits eos."""

    def __init__(self) -> None:
        self.shift = torch.tensor(7)

    def load_weights(self, weights):
        for name, tensor in weights:
            assert name == "shift", name
            self.shift = tensor.clone()


class FakeLLM:
    """Just enough of vllm.LLM for VLLMBackend: generate, apply_model, reset_prefix_cache."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.model = FakeEngineModel()
        self.requests: list[tuple[list[int], SimpleNamespace]] = []
        self.prefix_cache_resets = 0

    def generate(self, prompts, params, use_tqdm=True):
        results = []
        for prompt, p in zip(prompts, params, strict=True):
            self.requests.append((prompt["prompt_token_ids"], p))
            ids, token = [], prompt["prompt_token_ids"][-1]
            while len(ids) < p.max_tokens and (not ids or ids[-1] not in p.stop_token_ids):
                token = (token + int(self.model.shift)) % VOCAB
                ids.append(token)
            logprobs = [
                {t: SimpleNamespace(logprob=-0.25), t + 1: SimpleNamespace(logprob=-3.0)} for t in ids
            ]
            reason = "stop" if ids[-1] in p.stop_token_ids else "length"
            completion = SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=reason)
            results.append(SimpleNamespace(outputs=[completion]))
        return results

    def apply_model(self, func):
        return [func(self.model)]

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    module.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return module


@pytest.fixture(scope="module")
def llama(fixture_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(fixture_dir / "llama"))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    enc = tokenizer(
        ["What is 12 + 7?", "Hi", "x y z"], return_tensors="pt", padding=True, padding_side="left"
    )
    return enc.input_ids, enc.attention_mask


SCRIPT_TABLE = (torch.arange(VOCAB) * 5 + 3) % VOCAB


def _eos_for(kind: str, llama, prompts) -> int:
    """An EOS id that row 0 produces at its second step (so finished and unfinished rows both occur)."""
    if kind == "native":
        greedy = GenerationConfig(max_new_tokens=2, do_sample=False)
        out = generate(llama, *prompts, greedy, eos_token_id=-1, pad_token_id=PAD)
        return int(out.sequences[0, prompts[0].shape[1] + 1])
    last = int(prompts[0][0, -1])
    if kind == "scripted":
        return int(SCRIPT_TABLE[SCRIPT_TABLE[last]])
    return (last + 2 * int(FakeEngineModel().shift)) % VOCAB


def _make(kind: str, llama, eos: int) -> GenerationBackend:
    if kind == "native":
        return build_backend("native", llama, eos_token_id=eos, pad_token_id=PAD)
    if kind == "scripted":
        return ScriptedBackend(SCRIPT_TABLE, eos, PAD)
    return VLLMBackend("fixture-dir", eos_token_id=eos, pad_token_id=PAD)


def check_contract(out, input_ids, config: GenerationConfig, eos: int) -> None:
    batch, prompt_len = input_ids.shape
    width = out.sequences.shape[1] - prompt_len
    assert out.response_mask.shape == out.logprobs.shape == (batch, width) and out.finished.shape == (batch,)
    assert 1 <= width <= config.max_new_tokens
    assert torch.equal(out.sequences[:, :prompt_len], input_ids)
    response, mask = out.sequences[:, prompt_len:], out.response_mask.bool()
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(width)[None] < lengths[:, None])  # ones, then zeros
    assert (response[~mask] == PAD).all() and (out.logprobs[~mask] == 0).all()
    assert torch.isfinite(out.logprobs).all() and (out.logprobs[mask] <= 0).all()
    for row in range(batch):
        n = int(lengths[row])
        ids = response[row, :n].tolist()
        assert eos not in ids[:-1]  # nothing generated after a stop
        if out.finished[row]:
            assert ids[-1] == eos
        else:
            assert n == config.max_new_tokens and ids[-1] != eos


CONFIGS = {
    "greedy": GenerationConfig(max_new_tokens=6, do_sample=False),
    "sample": GenerationConfig(max_new_tokens=6, do_sample=True, top_k=40, top_p=0.95),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", list(CONFIGS))
def test_outputs_follow_the_contract(kind, mode, llama, prompts, fake_vllm):
    eos = _eos_for(kind, llama, prompts)
    with _make(kind, llama, eos) as backend:
        out = backend.generate(*prompts, CONFIGS[mode], generator=torch.Generator().manual_seed(0))
    check_contract(out, prompts[0], CONFIGS[mode], eos)
    if kind != "native" or mode == "greedy":  # row 0 stops at its second step, the others run on
        assert out.finished.tolist() == [True, False, False]


@pytest.mark.parametrize("kind", KINDS)
def test_equal_seeds_give_equal_outputs(kind, llama, prompts, fake_vllm):
    backend = _make(kind, llama, _eos_for(kind, llama, prompts))
    a, b = (
        backend.generate(*prompts, CONFIGS["sample"], generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)


def _new_weights(kind: str, fixture_dir) -> list[tuple[str, torch.Tensor]]:
    if kind == "native":
        from transformers import AutoModelForCausalLM

        torch.manual_seed(123)
        other = AutoModelForCausalLM.from_config(
            AutoModelForCausalLM.from_pretrained(str(fixture_dir / "llama")).config
        )
        return list(other.state_dict().items())
    if kind == "scripted":
        return [("table", (torch.arange(VOCAB) * 11 + 1) % VOCAB)]
    return [("shift", torch.tensor(13))]


@pytest.mark.parametrize("kind", KINDS)
def test_load_weights_changes_what_later_calls_generate(kind, llama, prompts, fixture_dir, fake_vllm):
    import copy

    model = copy.deepcopy(llama)  # the backend's copy gets new weights; the shared fixture does not
    eos = _eos_for(kind, llama, prompts)
    backend = _make(kind, model, eos)
    greedy = CONFIGS["greedy"]
    before = backend.generate(*prompts, greedy)
    weights = _new_weights(kind, fixture_dir)
    backend.load_weights(iter(weights))  # an iterator is enough
    after = backend.generate(*prompts, greedy)
    assert not torch.equal(before.sequences, after.sequences)
    if kind == "native":  # equal to generating with a model that has those weights
        reference = copy.deepcopy(llama)
        reference.load_state_dict(dict(weights))
        assert torch.equal(
            after.sequences,
            generate(reference, *prompts, greedy, eos_token_id=eos, pad_token_id=PAD).sequences,
        )
    if kind == "vllm-adapter":
        assert backend.llm.prefix_cache_resets == 1  # cached prompt KV from old weights is dropped


@pytest.mark.parametrize("kind", KINDS)
def test_a_closed_backend_refuses_work(kind, llama, prompts, fake_vllm):
    with _make(kind, llama, 2) as backend:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(*prompts, CONFIGS["greedy"])
    with pytest.raises(RuntimeError, match="closed"):
        backend.load_weights([])


def test_native_backend_enters_its_model_context_per_call(llama, prompts):
    import copy
    from contextlib import contextmanager

    model, entered = copy.deepcopy(llama), []

    @contextmanager
    def gathered():
        entered.append(True)
        yield model

    backend = NativeBackend(gathered, eos_token_id=2, pad_token_id=PAD)
    out = backend.generate(*prompts, CONFIGS["greedy"])
    backend.load_weights([("lm_head.weight", torch.zeros_like(model.lm_head.weight))])
    assert len(entered) == 2 and (model.lm_head.weight == 0).all()
    assert torch.equal(
        out.sequences,
        generate(llama, *prompts, CONFIGS["greedy"], eos_token_id=2, pad_token_id=PAD).sequences,
    )


def test_native_load_weights_rejects_unknown_names_and_shapes(llama):
    import copy

    backend = NativeBackend(copy.deepcopy(llama), eos_token_id=2, pad_token_id=PAD)
    with pytest.raises(KeyError, match="no parameter or buffer 'model.nope'"):
        backend.load_weights([("model.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        backend.load_weights([("lm_head.weight", torch.zeros(3, 3))])


def test_vllm_adapter_requests(prompts, fake_vllm):
    backend = VLLMBackend("some/model", eos_token_id=[101, 102], pad_token_id=PAD, gpu_memory_utilization=0.3)
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # apply_model runs in this process
    assert (
        backend.llm.kwargs["logprobs_mode"] == "raw_logprobs"
        and backend.llm.kwargs["gpu_memory_utilization"] == 0.3
    )
    out = backend.generate(*prompts, CONFIGS["sample"], generator=torch.Generator().manual_seed(1))
    ids, mask = prompts
    requests = backend.llm.requests
    assert [r[0] for r in requests] == [ids[b][mask[b] == 1].tolist() for b in range(3)]  # padding stripped
    params = [r[1] for r in requests]
    assert len({p.seed for p in params}) == 3  # one seed per row, from the generator
    assert params[0].temperature == 1.0 and params[0].top_k == 40 and params[0].stop_token_ids == [101, 102]
    assert params[0].logprobs == 0 and params[0].max_tokens == 6
    assert (out.logprobs[out.response_mask == 1] == -0.25).all()  # the chosen token's log-prob
    backend.generate(*prompts, GenerationConfig(max_new_tokens=2, do_sample=False, top_k=0))
    assert backend.llm.requests[-1][1].temperature == 0.0 and backend.llm.requests[-1][1].top_k == -1


def test_vllm_adapter_refuses_a_temperature_its_logprobs_cannot_follow(prompts, fake_vllm):
    backend = VLLMBackend("some/model", eos_token_id=2, pad_token_id=PAD)
    with pytest.raises(ValueError, match="temperature=0.7"):
        backend.generate(*prompts, GenerationConfig(max_new_tokens=2, temperature=0.7))


def test_build_backend_names_the_choices_and_the_vllm_extra(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown generation backend 'hf'.*'native', 'vllm'"):
        build_backend("hf")
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install 'chatforge\[vllm\]'"):
        build_backend("vllm", "some/model", eos_token_id=2, pad_token_id=PAD)


def test_pack_responses_checks_lengths():
    with pytest.raises(ValueError, match="row 0 has 2 tokens but 1 log-probs"):
        pack_responses(torch.ones(1, 2, dtype=torch.long), [[5, 6]], [[-1.0]], [False], PAD)


# --- the real vLLM engine (CUDA + vllm only) --------------------------------------------------------------


def needs_vllm(test):
    test = pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vllm (pip install 'chatforge[vllm]')"
    )(test)
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test)
    return pytest.mark.gpu(test)


def _llama_dir(root, tokenizer, seed: int):
    """A small Llama with head_dim 64 (vLLM's attention kernels do not all take the fixtures' 16)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=PAD, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    path = root / f"llama-{seed}"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model, path


@pytest.fixture(scope="module")
def real_vllm(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("vllm")
    start, path = _llama_dir(root, tokenizer, seed=0)
    other, _ = _llama_dir(root, tokenizer, seed=1)
    backend = VLLMBackend(str(path), eos_token_id=2, pad_token_id=PAD, dtype="float32", enforce_eager=True)
    yield backend, start, other
    backend.close()


def _teacher_forced_logprobs(model, out, prompts) -> torch.Tensor:
    ids, mask = prompts
    full_mask = torch.cat([mask, out.response_mask], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=full_mask, position_ids=positions).logits
    pred = logits[:, ids.shape[1] - 1 : -1].log_softmax(-1)
    return pred.gather(-1, out.sequences[:, ids.shape[1] :, None]).squeeze(-1) * out.response_mask


@needs_vllm
@pytest.mark.parametrize("mode", list(CONFIGS))
def test_real_vllm_follows_the_contract_and_its_weights(mode, real_vllm, prompts):
    backend, start, other = real_vllm
    config = CONFIGS[mode]
    out = backend.generate(*prompts, config, generator=torch.Generator().manual_seed(0))
    check_contract(out, prompts[0], config, eos=2)
    assert torch.allclose(out.logprobs, _teacher_forced_logprobs(start, out, prompts), atol=1e-3)
    backend.load_weights(other.state_dict().items())
    out = backend.generate(*prompts, config, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.logprobs, _teacher_forced_logprobs(other, out, prompts), atol=1e-3)
    backend.load_weights(start.state_dict().items())
