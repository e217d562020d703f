"""The actor EMA: seeded with the starting weights, ema = d * ema + (1 - d) * W of the weights the model
computes with (LoRA merged: EMA(W0 + BA), not EMA(B) EMA(A)), and the saved HF dir holds it."""

from __future__ import annotations

import pytest
import torch

from chatforge.engine.ema import EMA
from chatforge.engine.export import merged_tensors
from chatforge.models.loading import LoadOptions, load_causal_lm


def _effective(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value, _ in merged_tensors(model, True, True)}


def _move(model, seed: int) -> None:
    """Change every trainable tensor (LoRA's A and B both, so their product changes non-linearly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("lora", [0, 4])
def test_ema_of_the_effective_weights_seeded_with_the_start(fixture_dir, tmp_path, lora):
    from chatforge.models.lora import apply_lora

    model = load_causal_lm(str(fixture_dir / "llama"), LoadOptions(), torch.float32)
    if lora:
        model = apply_lora(model, lora, 2.0 * lora)
    _move(model, 0)  # LoRA's B starts at 0: move it so the start is a real merged weight
    w0 = _effective(model)
    ema = EMA(decay=0.75, module=model, is_main=True)  # seeded: ema = W0
    _move(model, 1)
    w1 = _effective(model)
    ema.update(model)  # 0.75 W0 + 0.25 W1
    changed = [n for n in w0 if not torch.equal(w0[n], w1[n])]
    assert changed and set(ema.shadow) >= set(changed)  # only tensors that can change are averaged
    for name in changed:
        torch.testing.assert_close(ema.shadow[name], 0.75 * w0[name] + 0.25 * w1[name])
    ema.save(model, tmp_path / "ema")

    saved = load_causal_lm(str(tmp_path / "ema"), LoadOptions(), torch.float32)
    state = saved.state_dict()
    for name in w0:
        want = 0.75 * w0[name] + 0.25 * w1[name] if name in changed else w0[name]
        torch.testing.assert_close(state[name], want, msg=name)
    if lora:  # the average of the product is not the product of the averages
        a = [n for n in changed if "q_proj" in n][0]
        assert not torch.allclose(state[a], w0[a]) and not torch.allclose(state[a], w1[a])


def test_ema_state_round_trips_for_resume(fixture_dir):
    model = load_causal_lm(str(fixture_dir / "llama"), LoadOptions(), torch.float32)
    ema = EMA(0.9, model, True)
    _move(model, 2)
    ema.update(model)
    again = EMA(0.9, model, True)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(again.shadow[k], v) for k, v in ema.shadow.items())


def test_ema_dir_is_written_atomically_and_stale_temp_dirs_go(fixture_dir, tmp_path, monkeypatch):
    """A crashed export's `.NAME.tmp-PID` dir (its process gone) is removed by the next export beside it; a
    failed write keeps the previous EMA dir whole and leaves no temp dir."""
    import subprocess
    import sys

    model = load_causal_lm(str(fixture_dir / "llama"), LoadOptions(), torch.float32)
    ema = EMA(0.5, model, True)
    out = tmp_path / "actor-ema"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".actor-ema.tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    ema.save(model, out)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["actor-ema"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    _move(model, 3)
    ema.update(model)
    monkeypatch.setattr(type(model), "save_pretrained", disk_full)
    with pytest.raises(OSError):
        ema.save(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actor-ema"]
