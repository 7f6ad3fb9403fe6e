"""KVLayout: the byte layout of the paged KV pool. Torch-free; shared with kv_transfer.

Pool tensor shape: [num_blocks, num_layers, 2 (k, v), block_size, num_kv_heads, head_dim].

Block-major on purpose: everything one block holds (all layers, K and V) is one contiguous
region of `block_bytes`, and blocks with adjacent ids are adjacent in memory. Shipping one
request's KV to another process therefore needs one descriptor per *run* of consecutive block
ids, not one per (layer, block, k/v); the block manager hands out ascending runs to keep the
run count low. Per-layer compute reads a strided view `pool[:, layer, kv]` (see kv_cache.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

LAYOUT_VERSION = 1
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class KVLayout:
    model: str  # model identity (architecture + shape); two sides must agree on it
    dtype: str
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    version: int = LAYOUT_VERSION

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.num_blocks,
            self.num_layers,
            2,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token over all layers (K and V)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        return self.token_bytes * self.block_size

    @property
    def pool_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def shard(self, rank: int, world: int) -> KVLayout:
        """The pool layout of tensor-parallel rank `rank` of `world`: kv heads
        [rank*H/world, (rank+1)*H/world). The model identity names the shard, so a raw block
        copy is only accepted between pools of the same head shard."""
        if world == 1:
            return self
        if self.num_kv_heads % world or not 0 <= rank < world:
            raise ValueError(f"cannot cut {self.num_kv_heads} kv heads into rank {rank} of {world}")
        return replace(
            self,
            model=f"{self.model}/tp{rank}of{world}",
            num_kv_heads=self.num_kv_heads // world,
        )

    def compatibility_hash(self) -> str:
        """Hash of everything two pools must share for raw block copies to be meaningful.

        num_blocks is excluded: sender and receiver pools may differ in size.
        """
        fields = asdict(self)
        del fields["num_blocks"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: KVLayout) -> list[str]:
        """Human-readable list of fields that break compatibility with `other`."""
        mine, theirs = asdict(self), asdict(other)
        return [
            f"{k}: {mine[k]!r} != {theirs[k]!r}"
            for k in mine
            if k != "num_blocks" and mine[k] != theirs[k]
        ]


def block_runs(block_ids: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """Coalesce block ids into (first_block_id, num_blocks) runs of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs
