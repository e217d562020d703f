"""Logit shaping against hand-computed values; the sampler against the distribution it must draw from."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.config.schema import GenerationConfig
from chatforge.generation import (
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    sampling,
    select_next_tokens,
)
from chatforge.generation.sampling import draw_uniforms, sample_inverse_cdf, seen_token_mask

NEG_INF = float("-inf")


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert filter_top_k(logits, 2).tolist() == [[NEG_INF, 4.0, 3.0, NEG_INF]]
    assert torch.equal(filter_top_k(logits, 0), logits)  # 0 = off


def test_top_p_keeps_smallest_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05: mass before each = 0, 0.5, 0.8, 0.95.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_top_p(logits, 0.7).isfinite().tolist()
    assert kept == [[True, True, False, False]]  # 0.5 < 0.7 keeps token 1; 0.8 >= 0.7 drops token 2
    assert filter_top_p(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert filter_top_p(logits, 0.01).isfinite().tolist() == [
        [True, False, False, False]
    ]  # top-1 always kept
    assert filter_top_p(logits, 1.0).isfinite().all()


def test_top_p_respects_unsorted_vocab_order():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    assert filter_top_p(logits, 0.7).isfinite().tolist() == [[False, True, False, True]]


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -1.0, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0, -4.0]]


def test_seen_token_mask_ignores_left_padding():
    ids = torch.tensor([[0, 0, 3, 2], [1, 3, 3, 3]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert seen_token_mask(ids, mask, 5).tolist() == [
        [False, False, True, True, False],
        [False, True, False, True, False],
    ]


def test_logprob_is_of_raw_tempered_logits_not_filtered():
    # Logits (ln 3, 0, 0, 0): softmax(z / 1) of token 0 = 3 / 6. Top-k=1 would make it 1, but the logprob
    # reported is the unfiltered one: ln(1/2).
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0, 0.0]])
    config = GenerationConfig(do_sample=True, top_k=1, temperature=1.0)
    tokens, logprobs = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [0]
    assert abs(logprobs.item() - math.log(0.5)) < 1e-6
    # T = 0.5 doubles the logits: (ln 9, 0, 0, 0) -> 9 / 12.
    config = GenerationConfig(do_sample=False, temperature=0.5)
    _, logprobs = select_next_tokens(logits, config)
    assert abs(logprobs.item() - math.log(0.75)) < 1e-6


def test_sampling_uses_the_generator():
    logits = torch.zeros(64, 50)  # uniform: 64 draws from 50 tokens
    config = GenerationConfig(do_sample=True)
    a, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(1))
    b, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(1))
    c, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- the inverse-CDF draw -------------------------------------------------------------------------------

DRAWS = 120_000


def _draw_counts(logits: torch.Tensor, config: GenerationConfig, seed: int = 0) -> torch.Tensor:
    """(V,) counts of DRAWS tokens sampled from the single row `logits` (V,), in batches of 20k rows."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.shape[0])
    for _ in range(DRAWS // 20_000):
        tokens, _ = select_next_tokens(logits.expand(20_000, -1).contiguous(), config, generator=gen)
        counts += torch.bincount(tokens, minlength=logits.shape[0]).float()
    return counts


def _chi2_limit(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 4.75 is a one-sided p of ~1e-6."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square of counts against probs, bins with expected count < 5 pooled into one."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts.double()[~small], counts.double()[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def _hand_made_distributions() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    peaked = torch.zeros(60)
    peaked[17] = 9.0  # p ~ 0.993, 59 tokens share the rest
    with_inf = torch.randn(60, generator=gen)
    with_inf[::3] = NEG_INF
    return {
        "uniform": torch.zeros(40),
        "random": torch.randn(300, generator=gen) * 2,
        "peaked": peaked,
        "with -inf": with_inf,
        "two modes": torch.tensor([5.0, 0.0, 0.0, 5.0, -3.0] * 12),
    }


@pytest.mark.parametrize("block", [4, 7, 256])  # two-level draw with tails; one block for small V
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_frequencies_match_softmax(block, temperature, monkeypatch):
    monkeypatch.setattr(sampling, "CDF_BLOCK", block)
    config = GenerationConfig(do_sample=True, temperature=temperature)
    for name, logits in _hand_made_distributions().items():
        probs = (logits / temperature).softmax(-1)
        counts = _draw_counts(logits, config)
        stat, df = _chi2(counts, probs)
        assert stat < _chi2_limit(df), (name, stat, df)
        assert 0.5 * (counts / DRAWS - probs).abs().sum() < 0.01, name
        assert counts[probs == 0].sum() == 0, name
        if name in ("random", "two modes") and temperature != 1.0:
            # The statistic has teeth: the same draws are far from the untempered softmax.
            stat_wrong, df_wrong = _chi2(counts, logits.softmax(-1))
            assert stat_wrong > 3 * _chi2_limit(df_wrong), name


@pytest.mark.parametrize(
    ("top_k", "top_p"), [(5, 1.0), (0, 0.8), (12, 0.9), (1, 1.0)], ids=["top_k", "top_p", "both", "k1"]
)
def test_filtered_tokens_are_never_drawn_and_the_rest_keep_their_odds(top_k, top_p, monkeypatch):
    monkeypatch.setattr(sampling, "CDF_BLOCK", 8)
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3)) * 1.5
    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=top_k, top_p=top_p)
    shaped = filter_top_p(filter_top_k(logits[None] / 0.8, top_k), top_p)[0]
    probs = shaped.softmax(-1)
    counts = _draw_counts(logits, config, seed=1)
    assert counts[~shaped.isfinite()].sum() == 0
    stat, df = _chi2(counts, probs)
    assert df == 0 or stat < _chi2_limit(df)


@pytest.mark.parametrize("block", [2, 4, 256])
def test_inverse_cdf_edges_never_return_zero_weight_tokens(block, monkeypatch):
    monkeypatch.setattr(sampling, "CDF_BLOCK", block)
    # Zero weights at both ends, zero blocks, and blocks that start with zeros.
    weights = torch.zeros(5, 13)
    weights[:, 6], weights[:, 9] = 1.0, 2.0
    below_one = float(
        torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    )
    # u = 1/3 puts the target exactly on the boundary between the two tokens' intervals.
    uniforms = torch.tensor([0.0, 1 / 3 - 1e-12, 1 / 3, 0.5, below_one], dtype=torch.float64)
    assert sample_inverse_cdf(weights, uniforms).tolist() == [6, 6, 9, 9, 9]


def test_inverse_cdf_reaches_tiny_probabilities():
    # p(token 1) ~ 5e-13: far below float32 resolution of a cumulative sum near 1, still reachable.
    weights = torch.tensor([[1.0, 1e-12, 1.0]])
    total = 2.0 + 1e-12
    inside = torch.tensor([(1.0 + 0.5e-12) / total], dtype=torch.float64)
    assert sample_inverse_cdf(weights, inside).tolist() == [1]
    assert sample_inverse_cdf(weights, torch.tensor([0.49], dtype=torch.float64)).tolist() == [0]


def test_rows_without_probability_mass_are_a_loud_error():
    logits = torch.zeros(3, 10)
    logits[1] = NEG_INF
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        select_next_tokens(
            logits, GenerationConfig(do_sample=True), generator=torch.Generator().manual_seed(0)
        )
    logits[1, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_next_tokens(
            logits, GenerationConfig(do_sample=True), generator=torch.Generator().manual_seed(0)
        )


def test_uniforms_come_from_the_generator_on_its_own_device():
    gen = torch.Generator().manual_seed(11)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    assert torch.equal(draw_uniforms(6, gen, torch.device("cpu")), expected)
    # Given uniforms replace the generator: the same uniforms give the same tokens.
    logits = torch.randn(6, 30)
    config = GenerationConfig(do_sample=True)
    a, _ = select_next_tokens(logits, config, uniforms=expected)
    b, _ = select_next_tokens(logits, config, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("generator_device", ["cuda", "cpu"])
def test_cuda_logits_with_a_generator_on_either_device(generator_device):
    logits = torch.randn(8, 1000, device="cuda")
    config = GenerationConfig(do_sample=True, top_k=50)
    a, lp = select_next_tokens(logits, config, generator=torch.Generator(generator_device).manual_seed(0))
    b, _ = select_next_tokens(logits, config, generator=torch.Generator(generator_device).manual_seed(0))
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert torch.allclose(lp, (logits.log_softmax(-1)).gather(1, a[:, None]).squeeze(1), atol=1e-5)


def test_logprobs_equal_log_softmax_on_every_path():
    logits = torch.randn(4, 70, generator=torch.Generator().manual_seed(5)) * 3
    seen = torch.zeros(4, 70, dtype=torch.bool)
    seen[:, :10] = True
    configs = [
        GenerationConfig(do_sample=False, temperature=1.0),
        GenerationConfig(do_sample=False, temperature=0.5),
        GenerationConfig(do_sample=True, temperature=1.3),
        GenerationConfig(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.5),
    ]
    for config in configs:
        temperature = config.temperature
        tokens, logprobs = select_next_tokens(
            logits, config, seen, generator=torch.Generator().manual_seed(0)
        )
        expected = (logits / temperature).log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        assert torch.allclose(logprobs, expected, atol=1e-5), config


def _vocab_sized_allocations(fn, numel: int) -> list[torch.dtype]:
    """dtypes of the new tensors of >= `numel` elements that `fn` allocates (in-place results do not count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: list[torch.dtype] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and t.numel() >= numel
                    and t.untyped_storage().data_ptr() not in inputs
                ):
                    found.append(t.dtype)
            return out

    with Recorder():
        fn()
    return found


def test_plain_sampling_makes_no_needless_vocabulary_copies():
    logits = torch.randn(8, 4096)
    gen = torch.Generator().manual_seed(0)

    def allocations(config, x=logits):
        return _vocab_sized_allocations(lambda: select_next_tokens(x, config, generator=gen), logits.numel())

    # fp32 logits, T = 1: the softmax output and the float64 copy behind the exact block masses; no
    # float() copy, no logits / T copy.
    assert allocations(GenerationConfig(do_sample=True)) == [torch.float32, torch.float64]
    assert allocations(GenerationConfig(do_sample=False)) == [torch.float32]
    # T != 1 needs logits / T; bf16 logits need one float32 copy.
    assert allocations(GenerationConfig(do_sample=True, temperature=0.7)) == [torch.float32] * 2 + [
        torch.float64
    ]
    assert allocations(GenerationConfig(do_sample=True), logits.bfloat16()) == [torch.float32] * 2 + [
        torch.float64
    ]
