"""Weights: safetensors checkpoint (single file or sharded) or seeded random ("dummy")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from engine.models.llama import CausalLM

# checkpoint name suffix -> (our parameter suffix, shard index within the fused tensor)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_LAYER = re.compile(r"^model\.(layers\.\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")


def _shard_slices(model: CausalLM, fused_name: str) -> list[int]:
    cfg = model.config
    if fused_name.endswith("qkv_proj"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [0, q, q + kv, q + 2 * kv]
    return [0, cfg.intermediate_size, 2 * cfg.intermediate_size]


def load_safetensors(model: CausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor into `model`; raise if any parameter is left unloaded."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in _checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if _IGNORED.search(name) or (name == "lm_head.weight" and model.lm_head is None):
                    continue  # tied checkpoints may still carry a copy of the embedding
                target, shard = _map_name(name)
                if target not in params:
                    raise ValueError(f"{path.name}: unexpected tensor {name!r}")
                param = params[target]
                tensor = f.get_tensor(name)
                with torch.no_grad():
                    if shard is None:
                        if tensor.shape != param.shape:
                            raise ValueError(
                                f"{name}: shape {tuple(tensor.shape)} != {param.shape}"
                            )
                        param.copy_(tensor)
                    else:
                        bounds = _shard_slices(model, target.rsplit(".", 1)[0])
                        param[bounds[shard] : bounds[shard + 1]].copy_(tensor)
                loaded.add(f"{target}#{shard}")
    expected = set()
    for name in params:
        fused = next((f for f in ("qkv_proj", "gate_up_proj") if f"{f}." in name), None)
        count = 0 if fused is None else (3 if fused == "qkv_proj" else 2)
        expected |= {f"{name}#None"} if count == 0 else {f"{name}#{i}" for i in range(count)}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:5]}"
        )


def _map_name(name: str) -> tuple[str, int | None]:
    m = _LAYER.match(name)
    if m is None:
        return name.removeprefix("model."), None
    layer, module, kind = m.groups()
    if module in _FUSED:
        fused, shard = _FUSED[module]
        return f"{layer}.{fused}.{kind}", shard
    return f"{layer}.{module}.{kind}", None


def init_dummy(model: CausalLM, seed: int) -> None:
    """Seeded random weights with checkpoint-like scales, for benchmarking shapes without files."""
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                gen = torch.Generator(device=param.device).manual_seed(seed * 100_003 + i)
                param.normal_(0.0, 0.02, generator=gen)
