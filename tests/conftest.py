"""Fixtures shared across the test tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct directory; converts it (~1 min) on first use.

    The cache is `$TANDEM_CACHE_DIR`, else `<repo>/.cache/tandem` (git-ignored), so every checkout
    converts once and test runs reuse it.
    """
    from engine.default_model import ensure_default_model

    return ensure_default_model(
        Path(os.environ.get("TANDEM_CACHE_DIR", REPO_ROOT / ".cache/tandem"))
    )


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight HF model dirs, built once per session with transformers (seeded):
    llama, qwen2 (random q/k/v biases), qwen3 (head_dim != hidden/heads, random qk-norms) and
    llama3_rope_tied (llama3 RoPE scaling, tied embeddings). See tests/engine/tiny_models.py."""
    from tests.engine.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny_models"))
