"""Tensor-parallel-invariant sharding: a TP=T engine computes a TP=1 engine's logits bit for bit.

Opt-in (EngineConfig.tp_invariant_shards = S): the model is cut into S "virtual shards", exactly as
a TP=S engine would cut it, and each of the T ranks computes its S/T virtual shards one by one with
the same GEMM shapes and contiguous operands a TP=S rank has; so every T dividing S (TP=1 included)
runs the same kernels on the same operands and rounds the same way:

  - column-parallel (fused qkv, fused gate_up): one GEMM per virtual shard, each of N = out/S
    columns (a GEMM of another N may pick another cuBLAS/oneDNN kernel with another reduction
    order), the outputs regrouped part by part ([q | k | v] of all the rank's shards);
  - row-parallel (o_proj, down_proj): each virtual shard's partial product in fp32 (cuBLAS
    bf16 -> fp32 output, no intermediate bf16 rounding), all S partials gathered on every rank
    (an all-gather, never an all-reduce whose summation order NCCL picks per world size), summed
    in the fixed order 0, 1, ..., S-1 in fp32 and cast to the model dtype once;
  - RoPE per virtual shard too (ShardedRotary: its kernel tiles all of a call's heads);
  - everything else is replicated or per head: embedding, norms, lm_head (the full vocabulary on
    every rank), and attention, whose Triton kernels run one program per (row, head) or
    (row, kv head, split); in this mode the decode split count is fixed per engine, not per batch
    and kv-head count (GpuModelRunner).

Rank r holds virtual shards [r * S/T, (r + 1) * S/T): the union of their heads is the rank's
heads in the default sharding, so the KV pool layout (kv_layout_for_rank) and KV transfer are the
same in both modes. Not invariant: per-head q/k norms (Qwen3: a torch reduction over [N, H, D]
whose launch shape follows H) and any change of batch composition in eager steps (cuBLAS picks
kernels by M as well); see docs/design.md.

Costs (only in this mode): S/T GEMM (and RoPE) launches instead of one, a concatenation per
column-parallel layer and RoPE when S/T > 1, fp32 partials gathered (2x the bytes of a bf16
all-reduce's input, T x its output) and an fp32 sum per row-parallel layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.config import check_invariant_shards
from engine.layers import RotaryEmbedding
from engine.models.llama import MLP, Attention, CausalLM, DecoderLayer


def _part_rows(w: torch.Tensor, sizes: list[int], shard: int, shards: int) -> torch.Tensor:
    """Virtual shard `shard` of a tensor fused along dim 0 from parts of `sizes`: its slice of
    each part, concatenated (what a TP=`shards` rank `shard` holds)."""
    parts = torch.split(w, sizes, dim=0)
    return torch.cat([p.chunk(shards, dim=0)[shard] for p in parts], dim=0).contiguous()


class InvariantColumnLinear(nn.Module):
    """y = [part 0 of every virtual shard | part 1 of every virtual shard | ...].

    One F.linear per virtual shard, each on a contiguous [out/S, in] weight: the GEMM a TP=S
    rank runs. With one virtual shard per rank the output is that GEMM's, with no copy."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        sizes: list[int],
        first: int,
        count: int,
        shards: int,
    ) -> None:
        super().__init__()
        self.first = first  # the first of this rank's virtual shards
        self.part_sizes = [s // shards for s in sizes]  # one virtual shard's part widths
        ids = range(first, first + count)
        self.weights = nn.ParameterList(
            nn.Parameter(_part_rows(weight, sizes, s, shards), requires_grad=False) for s in ids
        )
        self.biases = (
            None
            if bias is None
            else nn.ParameterList(
                nn.Parameter(_part_rows(bias, sizes, s, shards), requires_grad=False) for s in ids
            )
        )

    def shard_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each of the rank's virtual shards' GEMM output, [N, out/S]."""
        return [
            F.linear(x, w, None if self.biases is None else self.biases[j])
            for j, w in enumerate(self.weights)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.shard_outputs(x)
        if len(outs) == 1:
            return outs[0]
        split = [o.split(self.part_sizes, dim=-1) for o in outs]
        return torch.cat([s[p] for p in range(len(self.part_sizes)) for s in split], dim=-1)


class InvariantRowLinear(nn.Module):
    """y = cast(sum over s = 0..S-1 of fp32(x_s @ W_s^T)), the sum in that order on every rank.

    x [N, in/T] holds the rank's virtual shards' input columns side by side; shard j's slice is
    made contiguous before its GEMM (the operand a TP=S rank has)."""

    def __init__(
        self, weight: torch.Tensor, first: int, count: int, shards: int, world: int
    ) -> None:
        super().__init__()
        self.shards, self.world, self.count, self.first = shards, world, count, first
        self.per = weight.shape[1] // shards  # input features per virtual shard
        self.out_features = weight.shape[0]
        # cuBLAS returns fp32 products of bf16/fp16 operands directly (mm out_dtype); oneDNN has
        # no such GEMM: on CPU the half-precision weights are kept in fp32 (exact upcast), the
        # activations upcast per call. Either way the same function on every TP size.
        self.half_on_cuda = weight.is_cuda and weight.dtype != torch.float32
        keep = weight if self.half_on_cuda else weight.float()
        self.weights = nn.ParameterList(
            nn.Parameter(keep[:, s * self.per : (s + 1) * self.per].contiguous(), False)
            for s in range(first, first + count)
        )

    def _partial(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.half_on_cuda:
            return torch.mm(x, w.t(), out_dtype=torch.float32)
        return torch.mm(x.float(), w.t())

    def local_partials(self, x: torch.Tensor) -> torch.Tensor:
        """[count, N, out] fp32: the rank's virtual shards' partial products."""
        if self.count == 1:
            return self._partial(x, self.weights[0]).unsqueeze(0)
        return torch.stack(
            [
                self._partial(x[:, j * self.per : (j + 1) * self.per].contiguous(), w)
                for j, w in enumerate(self.weights)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.local_partials(x)
        if self.world == 1:
            partials = local
        else:
            n = x.shape[0]
            partials = torch.empty(
                (self.shards, n, self.out_features), dtype=torch.float32, device=x.device
            )
            if x.is_cuda:  # NCCL writes the one output tensor in place: no copy-back
                dist.all_gather_into_tensor(partials, local)
            else:  # gloo: the list form (all_gather_into_tensor is deprecated in torch 2.13)
                dist.all_gather(list(partials.view(self.world, self.count, n, -1).unbind(0)), local)
        acc = partials[0].clone()
        for s in range(1, self.shards):  # the fixed order: never a tree whose shape follows T
            acc += partials[s]
        return acc.to(x.dtype)


class ShardedRotary(RotaryEmbedding):
    """RoPE applied to each virtual shard's heads by a call of its own, [N, Hq/S, D] and
    [N, Hk/S, D], as a TP=S rank applies it.

    The CUDA RoPE kernel (triton_fused.rope) handles all of a call's heads in one program tile, so
    a head's bits could follow its place in that tile and the tile's compiled shape (HEADS_PAD):
    measured on two H200s (bench/tp_invariant_check, before RoPE was compiled without FP fusion),
    TP=1's heads 16..31 left attention with other bits than TP=2 rank 1's heads 0..15 while the
    q/k/v GEMM outputs were equal. Per shard, every TP size launches the same kernel on the same
    shapes. Shares the wrapped table's cos/sin buffers (no copy)."""

    def __init__(self, rotary: RotaryEmbedding, count: int) -> None:
        nn.Module.__init__(self)  # no new tables: the shared ones below
        self.register_buffer("cos", rotary.cos, persistent=False)
        self.register_buffer("sin", rotary.sin, persistent=False)
        self.count = count

    def shard_outputs(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(q, k) after RoPE for each of the rank's virtual shards."""
        return [
            RotaryEmbedding.forward(self, positions, qj, kj)
            for qj, kj in zip(q.chunk(self.count, dim=1), k.chunk(self.count, dim=1), strict=True)
        ]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.shard_outputs(positions, q, k)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def shard_model_invariant(model: CausalLM, rank: int, world: int, shards: int) -> None:
    """Replace the model's projections by rank `rank`'s virtual shards (of `shards`), in place.
    `model` holds the full, replicated weights; world may be 1 (a TP=1 engine in this mode)."""
    cfg = model.config
    check_invariant_shards(shards, world, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
    count = shards // world
    first = rank * count
    for layer in model.layers:
        assert isinstance(layer, DecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn, Attention) and isinstance(mlp, MLP)
        assert isinstance(attn.qkv_proj, nn.Linear) and isinstance(attn.o_proj, nn.Linear)
        assert isinstance(mlp.gate_up_proj, nn.Linear) and isinstance(mlp.down_proj, nn.Linear)
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        attn.qkv_proj = InvariantColumnLinear(
            attn.qkv_proj.weight, attn.qkv_proj.bias, sizes, first, count, shards
        )
        attn.o_proj = InvariantRowLinear(attn.o_proj.weight, first, count, shards, world)
        attn.rotary = ShardedRotary(attn.rotary, count)
        attn.num_heads //= world
        attn.num_kv_heads //= world
        attn.q_size //= world
        attn.kv_size //= world
        inter = cfg.intermediate_size
        mlp.gate_up_proj = InvariantColumnLinear(
            mlp.gate_up_proj.weight, None, [inter, inter], first, count, shards
        )
        mlp.down_proj = InvariantRowLinear(mlp.down_proj.weight, first, count, shards, world)
