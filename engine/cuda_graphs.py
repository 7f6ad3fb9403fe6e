"""DecodeGraphs: CUDA graphs of the decode step (forward + logits), one per batch-size bucket.

Captured once at start-up, largest bucket first, all in one memory pool. A decode step of B
rows replays the smallest bucket >= B; rows [B, bucket) are padding: slot -1 (the K/V store
skips them), context length 0 (attention writes zeros), token 0, position 0. Their logits are
computed and ignored.

Invariant: the graphs read only the static input buffers below; `run` overwrites every
element of a bucket's slice (padding included) before each replay, so nothing of an earlier
step leaks in. The KV pool and the weights are captured by address: never reallocate them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.gpu_attention import GpuAttentionMetadata
from engine.kv_cache import KVCache
from engine.models.llama import CausalLM

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """The default buckets: BUCKETS below max_batch, then max_batch itself."""
    return (*(b for b in BUCKETS if b < max_batch), max_batch)


@dataclass(frozen=True, slots=True)
class DecodeInputs:
    """Host-side (pinned) inputs of one decode step, already padded to `bucket` rows."""

    bucket: int
    input_ids: torch.Tensor  # [bucket] int64
    positions: torch.Tensor  # [bucket] int64
    slot_mapping: torch.Tensor  # [bucket] int64, -1 for padding
    block_tables: torch.Tensor  # [bucket, max_blocks] int32, 0 for padding
    context_lens: torch.Tensor  # [bucket] int32, 0 for padding


class DecodeGraphs:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        buckets: tuple[int, ...],
        max_blocks: int,
        num_splits: Callable[[int], int],
    ) -> None:
        """buckets: ascending batch sizes to capture (buckets_up_to); num_splits(bucket): the
        decode attention's context splits for that bucket (GpuModelRunner.decode_splits)."""
        device = kv_cache.pool.device
        self.max_blocks = max_blocks
        self.buckets = buckets
        top = self.buckets[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((top, max_blocks), dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(top, dtype=torch.int32, device=device)
        empty = torch.zeros(0, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        pool = None
        for b in reversed(self.buckets):
            meta = GpuAttentionMetadata(
                slot_mapping=self.slot_mapping[:b],
                num_decodes=b,
                decode_block_tables=self.block_tables[:b],
                decode_context_lens=self.context_lens[:b],
                decode_num_splits=num_splits(b),
                prefill_tile_seq=empty,
                prefill_tile_q0=empty,
                prefill_q_start=empty,
                prefill_q_len=empty,
                prefill_num_computed=empty,
                prefill_block_tables=empty.view(0, 1),
            )

            def step(b: int = b, meta: GpuAttentionMetadata = meta) -> torch.Tensor:
                hidden = model(self.input_ids[:b], self.positions[:b], meta, kv_cache)
                return model.compute_logits(hidden)

            step()  # warm-up: Triton compiles, cuBLAS picks its kernels (outside the capture)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = step()
            pool = graph.pool()
            self._graphs[b] = (graph, logits)
        torch.cuda.synchronize(device)

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch {batch} exceeds the largest captured bucket {self.max_batch}")

    def graph(self, bucket: int) -> torch.cuda.CUDAGraph:
        return self._graphs[bucket][0]

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Replay the bucket's graph on `inputs`; returns its logits [bucket, vocab] (a static
        buffer: read it before the next replay)."""
        self.load(inputs)
        return self.replay(inputs.bucket)

    def load(self, inputs: DecodeInputs) -> None:
        """Queue the copies of `inputs` into the static buffers (the caller may then change
        input_ids[:bucket] on the device, before `replay`)."""
        b = inputs.bucket
        self.input_ids[:b].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:b].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(inputs.slot_mapping, non_blocking=True)
        self.block_tables[:b].copy_(inputs.block_tables, non_blocking=True)
        self.context_lens[:b].copy_(inputs.context_lens, non_blocking=True)

    def replay(self, bucket: int) -> torch.Tensor:
        graph, logits = self._graphs[bucket]
        graph.replay()
        return logits
