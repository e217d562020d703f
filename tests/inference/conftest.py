"""A chat model whose greedy replies are non-empty and depend on the whole conversation.

The fixture models are freshly initialised with small weights, so they only repeat the last prompt token
(a special token: empty replies). Larger random weights make every reply a function of the full prompt,
which is what tests of history, batching and concurrency need to tell answers apart.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def chat_model_dir(fixture_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("inference") / "chat-llama"
    shutil.copytree(fixture_dir / "llama", out)
    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir / "llama"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def chat_model(chat_model_dir: Path):
    from chatforge.inference import ChatModel

    return ChatModel(chat_model_dir)
