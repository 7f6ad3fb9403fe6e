"""Tensor parallelism inside one worker: Megatron-style sharding of the decoder over ranks.

One process per rank (torch.distributed initialised by the entry point before the engine is
built: engine_ranks.init_ranks; NCCL for tensors on GPUs, gloo on CPU). Every rank holds:
  - q/k/v and gate/up projections column-parallel: its own query heads, kv heads and
    intermediate columns (the fused weights are sliced part by part);
  - o_proj and down_proj row-parallel: its slice of the input features, outputs all-reduced;
  - embedding, norms and lm_head replicated (every rank computes the full logits);
  - a KV pool of its own kv heads only: the block ids are the same on every rank (one block
    manager, on rank 0), the bytes of a block differ. Shipping a request's KV from a TP worker
    is therefore one transfer per rank, each of its own heads (see kv_layout_for_rank).

Rank 0 owns the scheduler; each step it broadcasts the StepPlan to the other ranks over a gloo
group (a few hundred bytes of pickle) and all ranks run the same forward; only rank 0 samples.
With overlapped steps rank 0 also broadcasts the sampled ids over NCCL (on the stream, no host
sync), since the next plan's token_on_device rows read them on every rank.

Invariant: num_heads and num_kv_heads are multiples of the world size (checked at start).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from engine.kv_layout import KVLayout
from engine.models.llama import MLP, Attention, CausalLM, DecoderLayer

IDLE_FOREVER = timedelta(days=365)


@dataclass(frozen=True, slots=True)
class TensorParallel:
    rank: int
    world_size: int
    plan_group: dist.ProcessGroup | None  # gloo group for StepPlans; None when world_size 1

    @classmethod
    def from_initialized(cls, world_size: int) -> TensorParallel:
        """Read rank/world from the process group the entry point initialised."""
        if world_size == 1:
            return cls(0, 1, None)
        if not dist.is_initialized():
            raise RuntimeError(
                f"tensor_parallel_size={world_size} needs torch.distributed initialised first "
                "(one process per rank; see bench/gpu_tp.py)"
            )
        if dist.get_world_size() != world_size:
            raise ValueError(
                f"tensor_parallel_size={world_size} but the process group has "
                f"{dist.get_world_size()} ranks"
            )
        # No timeout worth the name: a follower waits in a broadcast for as long as the worker
        # is idle. A dead rank is handled by the process tree (worker_ranks), not by this.
        group = dist.new_group(backend="gloo", timeout=IDLE_FOREVER)
        return cls(dist.get_rank(), world_size, group)


def check_divisible(num_heads: int, num_kv_heads: int, intermediate: int, world: int) -> None:
    for name, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if n % world:
            raise ValueError(f"{name}={n} is not divisible by tensor_parallel_size={world}")
    if intermediate % world:
        raise ValueError(f"intermediate_size={intermediate} is not divisible by {world}")


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T): the input features are split over the ranks.

    A wrapper around a plain linear (not an nn.Linear subclass): the CPU path swaps every
    nn.Linear for a packed one after sharding (cpu_linear.pack_linears), which replaces the
    inner linear and keeps the all-reduce."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.linear: nn.Module = _linear(weight, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.linear(x)
        dist.all_reduce(y)
        return y


def _rows(w: torch.Tensor, sizes: list[int], tp: TensorParallel) -> torch.Tensor:
    """Rank's slice of each part of a weight fused along dim 0 (e.g. [q | k | v])."""
    parts = torch.split(w, sizes, dim=0)
    mine = [p.chunk(tp.world_size, dim=0)[tp.rank] for p in parts]
    return torch.cat(mine, dim=0).contiguous()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding the given (already sharded) tensors, allocated nowhere else."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def shard_model(model: CausalLM, tp: TensorParallel) -> None:
    """Cut a loaded, replicated model down to rank `tp.rank`'s shard, in place."""
    cfg = model.config
    world = tp.world_size
    check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, world)
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn, Attention) and isinstance(mlp, MLP)
        assert isinstance(attn.qkv_proj, nn.Linear) and isinstance(mlp.gate_up_proj, nn.Linear)
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        bias = attn.qkv_proj.bias
        attn.qkv_proj = _linear(
            _rows(attn.qkv_proj.weight, sizes, tp),
            None if bias is None else _rows(bias, sizes, tp),
        )
        assert isinstance(attn.o_proj, nn.Linear) and isinstance(mlp.down_proj, nn.Linear)
        o = attn.o_proj.weight.chunk(world, dim=1)[tp.rank].contiguous()
        attn.o_proj = RowParallelLinear(o)
        attn.num_heads //= world
        attn.num_kv_heads //= world
        attn.q_size //= world
        attn.kv_size //= world
        inter = cfg.intermediate_size
        mlp.gate_up_proj = _linear(_rows(mlp.gate_up_proj.weight, [inter, inter], tp), None)
        down = mlp.down_proj.weight.chunk(world, dim=1)[tp.rank].contiguous()
        mlp.down_proj = RowParallelLinear(down)


def kv_layout_for_rank(layout: KVLayout, tp: TensorParallel) -> KVLayout:
    """The pool layout of one rank: its own kv heads (KVLayout.shard)."""
    return layout.shard(tp.rank, tp.world_size)
