"""Tiny random-weight Hugging Face model dirs (Llama, Qwen2, Qwen3, Llama 3 RoPE + tied
embeddings) for parity tests against transformers. Built with transformers itself, seeded.

Weights are re-drawn at "trained-like" scales rather than transformers' init (std 0.02, zero
biases, unit norms): that would give near-uniform logits, where fp32 rounding noise could flip
a greedy argmax, and would leave the bias and qk-norm paths untested.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

VOCAB_SIZE = 512
MAX_POSITIONS = 256

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}

# name -> (transformers config class name, model class name, config overrides)
TINY_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 10000.0}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"rope_theta": 1_000_000.0}),
    # head_dim 32 != hidden / heads (16): q/o projections are not square
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, "rope_theta": 1_000_000.0}),
    "llama3_rope_tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
}


def _randomize(model: torch.nn.Module, seed: int, tied: bool) -> None:
    """Matrices ~ N(0, 1/fan_in); biases ~ N(0, 0.5); norms ~ 1 + N(0, 0.2); embeddings ~ N(0, 1),
    or N(0, 0.1) when tied: a large tied embedding makes every token predict itself (the residual
    stream carries its own embedding), and greedy decoding collapses into one repeated token."""
    gen = torch.Generator().manual_seed(seed)
    embed_std = 0.1 if tied else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(embed_std * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))


def build_tiny_model(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model `name` (a key of TINY_MODELS) as an fp32 HF dir; return the dir."""
    import transformers

    config_cls, model_cls, overrides = TINY_MODELS[name]
    config = getattr(transformers, config_cls)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32)
    _randomize(model, seed, config.tie_word_embeddings)
    if name == "qwen2":
        biases = [n for n, _ in model.named_parameters() if n.endswith("bias")]
        assert len(biases) == 3 * config.num_hidden_layers, biases  # q, k, v per layer
    if name == "qwen3":
        assert any("q_norm" in n for n, _ in model.named_parameters())
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_models(root: Path, seed: int = 0) -> dict[str, Path]:
    return {name: build_tiny_model(name, root / name, seed) for name in TINY_MODELS}
