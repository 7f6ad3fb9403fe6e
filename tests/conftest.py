"""Fixtures shared across the test tree."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer and chat
    template: fast workers that still speak text. Its outputs are gibberish, never the point."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, out / name)
    return out
