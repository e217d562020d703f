"""Pure checks of the DeepSpeed config derivation and the lr schedule."""

from __future__ import annotations

import json

import pytest

from chatforge.config import ConfigError, EngineConfig, OptimConfig, TrainedModel
from chatforge.engine import ModelSpec


def test_zero3_offload_config_has_no_optimizer_block():
    from chatforge.engine.ds_config import build_ds_config

    spec = ModelSpec("m", zero_stage=3, offload=True, precision="fp32", learning_rate=1e-5)
    ds = build_ds_config(spec, micro_batch_size=4, gradient_accumulation_steps=2)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert "optimizer" not in ds and not ds["bf16"]["enabled"]


def test_user_json_overrides_and_rejects_optimizer(tmp_path):
    from chatforge.engine.ds_config import build_ds_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "train_batch_size": 99}))
    ds = build_ds_config(ModelSpec("m", zero_stage=2, deepspeed_config=str(user)), 2, 1)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123}
    assert "train_batch_size" not in ds
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="names an optimizer"):
        build_ds_config(ModelSpec("m", deepspeed_config=str(user)), 2, 1)
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(ModelSpec("m", deepspeed_config=str(user)), 2, 1)


def test_spec_resolves_a_role_and_the_shared_sections():
    engine = EngineConfig(offload=True, gradient_checkpointing=True, precision="fp32")
    trained = ModelSpec.trained(
        TrainedModel("a", 3e-5, 2, 8), engine, OptimConfig(warmup=5, gradient_clipping=0.5)
    )
    assert (trained.zero_stage, trained.lora_r, trained.lora_alpha, trained.learning_rate) == (
        2,
        8,
        16.0,
        3e-5,
    )
    assert (
        trained.offload
        and trained.gradient_checkpointing
        and trained.trainable
        and trained.warmup_steps(100) == 5
    )
    frozen = ModelSpec.frozen("r", 2, engine)
    assert not frozen.trainable and not frozen.offload  # frozen weights are offloaded only at ZeRO-3
    assert ModelSpec.frozen("r", 3, engine).offload
    # A frozen model has no optimizer, and DeepSpeed does no clipping for it.
    from chatforge.engine.ds_config import build_ds_config

    assert build_ds_config(frozen, 1, 1)["gradient_clipping"] == 0.0


def test_cpu_precision_auto_follows_the_bf16_detection_and_fp16_is_refused(monkeypatch):
    """On a CPU box 'auto' is bf16 only where the CPU has native bf16 matmuls (the boxes differ: this test
    must not depend on which one runs it)."""
    from chatforge.engine import ds_config
    from chatforge.engine.ds_config import resolve_precision

    monkeypatch.setattr(ds_config.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ds_config, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(ds_config, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16"
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        resolve_precision("fp16")


def test_lr_schedule_warmup_then_cosine_and_linear():
    from chatforge.engine.optim import lr_lambda

    cos = lr_lambda(ModelSpec("m", lr_scheduler="cosine", warmup=2), total_steps=6)
    # warmup 1/2, 2/2; then cos over 4 steps: 0.5*(1+cos(pi*k/4)) for k = 0..4
    assert [round(cos(s), 4) for s in range(7)] == [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464, 0.0]
    lin = lr_lambda(ModelSpec("m", lr_scheduler="linear", warmup=0.5), total_steps=4)  # a fraction: 2 steps
    assert [round(lin(s), 3) for s in range(5)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    const = lr_lambda(ModelSpec("m", lr_scheduler="constant", warmup=1), total_steps=4)
    assert [const(s) for s in range(3)] == [1.0, 1.0, 1.0]


def test_param_groups_skip_decay_on_norms_and_biases():
    import torch

    from chatforge.engine.optim import param_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_stage0_grad_norm_is_the_pre_clipping_norm(fixture_dir):
    """DeepSpeed reports no norm at ZeRO-0; the engine's own equals a by-hand norm of the same gradients."""
    import torch

    from chatforge.engine import TrainEngine
    from chatforge.models.loading import LoadOptions, load_causal_lm

    engine = TrainEngine(
        lambda dtype: load_causal_lm(str(fixture_dir / "llama"), LoadOptions(), dtype),
        ModelSpec(str(fixture_dir / "llama"), precision="fp32", learning_rate=1e-3, gradient_clipping=0.01),
        micro_batch_size=2,
    )
    ids = torch.randint(10, 400, (2, 8), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    grads = [p.grad.detach().clone() for p in engine.module.parameters() if p.grad is not None]
    by_hand = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()
    engine.step()
    assert by_hand > 0.01  # so clipping to 0.01 changed the gradients the optimizer used
    assert engine.grad_norm == pytest.approx(by_hand, rel=1e-5)


def test_auto_precision_reads_the_cpu_flags():
    from chatforge.engine.ds_config import cpu_has_fast_bf16

    assert cpu_has_fast_bf16("flags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\n")
    assert cpu_has_fast_bf16("flags\t\t: fpu avx512f avx512_bf16\n")
    assert not cpu_has_fast_bf16("flags\t\t: fpu sse2 avx avx2 fma\n")


def test_fused_adamw_steps_equal_the_per_tensor_loop():
    """The fused optimizer chatforge builds gives the same weights as torch's reference loop."""
    import torch

    from chatforge.engine.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    spec = ModelSpec("m", learning_rate=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, spec)
    assert fused.defaults["fused"]
    from chatforge.engine.optim import BETAS, EPS, param_groups

    loop = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-2, betas=BETAS, eps=EPS, foreach=False)
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, opt in ((model, fused), (twin, loop)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
