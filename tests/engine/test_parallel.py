"""Tensor parallelism on CPU: 2 ranks over gloo (one process each) against the unsharded model.

The sharding (column-parallel qkv/gate_up, row-parallel o/down with all-reduce, per-rank kv
heads and KV pool) must give the logits of the replicated model, through a prefill and a
decode step that reads the rank's own KV pool. The GPU runner adds NCCL, CUDA graphs and the
plan broadcast on top (bench/gpu_tp.py, nvidia-h200-x2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.attention import AttentionMetadata, PrefillSpan
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.kv_layout import KVLayout
from engine.loader import init_dummy
from engine.models.llama import CausalLM
from engine.parallel import TensorParallel, check_divisible, kv_layout_for_rank, shard_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
BS, PROMPT = 4, 10


def _metas(n: int) -> tuple[AttentionMetadata, AttentionMetadata]:
    """A prefill of n tokens in blocks 0.., then one decode step at position n."""
    pos = torch.arange(n)
    prefill = AttentionMetadata(
        slot_blocks=pos // BS,
        slot_offsets=pos % BS,
        num_decodes=0,
        decode_block_tables=None,
        decode_seq_lens=None,
        decode_kernel=False,
        decode_mask=None,
        prefills=(PrefillSpan(0, n, 0, torch.empty(0, dtype=torch.long), None),),
    )
    nb = n // BS + 1
    decode = AttentionMetadata(
        slot_blocks=torch.tensor([n // BS]),
        slot_offsets=torch.tensor([n % BS]),
        num_decodes=1,
        decode_block_tables=torch.arange(nb).view(1, nb),
        decode_seq_lens=torch.tensor([n + 1]),
        decode_kernel=False,
        decode_mask=(torch.arange(nb * BS) < n + 1).view(1, 1, 1, nb * BS),
        prefills=(),
    )
    return prefill, decode


def _run(model: CausalLM, layout: KVLayout) -> torch.Tensor:
    kv = KVCache(layout, torch.device("cpu"))
    ids = torch.arange(3, 3 + PROMPT + 1)
    prefill, decode = _metas(PROMPT)
    h1 = model(ids[:PROMPT], torch.arange(PROMPT), prefill, kv)
    h2 = model(ids[PROMPT:], torch.tensor([PROMPT]), decode, kv)
    return model.compute_logits(torch.cat([h1, h2]))


def _layout(cfg: ModelConfig) -> KVLayout:
    return KVLayout("tiny", "float32", 8, BS, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = ModelConfig.from_dict(CONFIG)
        model = CausalLM(cfg, 128).eval().requires_grad_(False)
        init_dummy(model, seed=5)
        with torch.inference_mode():
            reference = _run(model, _layout(cfg))
            tp = TensorParallel.from_initialized(world)
            shard_model(model, tp)
            sharded = _run(model, kv_layout_for_rank(_layout(cfg), tp))
        torch.save({"reference": reference, "sharded": sharded}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., None], *args: object, world: int = 2) -> None:
    """fn(rank, *args) in `world` spawned processes (the ranks); returns when all have exited,
    raises if one failed."""
    mp.start_processes(fn, args=args, nprocs=world, start_method="spawn")


def test_two_ranks_match_the_replicated_model(tmp_path: Path) -> None:
    world = 2
    spawn(_rank, world, str(tmp_path / "init"), str(tmp_path), world=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["sharded"], got["reference"], atol=1e-5, rtol=1e-5)


def test_each_rank_has_its_own_kv_layout() -> None:
    base = KVLayout("m", "bfloat16", 100, 16, 32, 8, 128)
    shards = [kv_layout_for_rank(base, TensorParallel(r, 2, None)) for r in range(2)]
    assert all(s.num_kv_heads == 4 and s.block_bytes * 2 == base.block_bytes for s in shards)
    # a rank's blocks are only raw-copy compatible with the same rank's pool on the other side
    assert shards[0].compatibility_hash() != shards[1].compatibility_hash()
    assert shards[0].differences(shards[1]) == [
        "model: 'm/tp0of2' != 'm/tp1of2'",
    ]
    assert kv_layout_for_rank(base, TensorParallel(0, 1, None)) == base
    assert dataclasses.replace(shards[1], num_blocks=7).compatibility_hash() == (
        shards[1].compatibility_hash()
    )


def test_indivisible_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        check_divisible(8, 3, 1536, 2)
