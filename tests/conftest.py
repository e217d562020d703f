"""Shared test fixtures: the offline tokenizer and tiny models, built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# One torch thread per process: on the 2-core CI box it is faster and multi-process tests don't fight.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tokenised data of the test session (the CLI processes the tests start inherit it).
os.environ.setdefault("CHATFORGE_CACHE_DIR", tempfile.mkdtemp(prefix="chatforge-test-cache-"))


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    """Tokenizer + tiny models of every family (written once per test session)."""
    from chatforge.fixtures import write_fixtures

    out = tmp_path_factory.mktemp("fixtures")
    write_fixtures(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(fixture_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(fixture_dir / "tokenizer"))
