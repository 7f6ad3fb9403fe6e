"""KVCache: the paged KV pool tensor, allocated from a KVLayout (see kv_layout.py)."""

from __future__ import annotations

import torch

from engine.kv_layout import KVLayout

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class KVCache:
    """Owns the pool tensor [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim].

    Which blocks hold what is the BlockManager's business; this class only stores bytes.
    """

    def __init__(self, layout: KVLayout, device: torch.device) -> None:
        self.layout = layout
        # zeros, not empty: a bug that reads an unwritten slot then reads 0s, deterministically
        self.pool = torch.zeros(layout.shape, dtype=TORCH_DTYPES[layout.dtype], device=device)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided K and V views of one layer, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.pool[:, layer, 0], self.pool[:, layer, 1]

    def block_address(self, block_id: int) -> int:
        """Address of a block's first byte; a block is `layout.block_bytes` contiguous bytes."""
        return self.pool.data_ptr() + block_id * self.layout.block_bytes

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy of the given blocks, [len(block_ids), num_layers, 2, block_size, heads, dim]."""
        return self.pool[torch.tensor(block_ids, device=self.pool.device)].clone()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Overwrite the given blocks with `data` shaped as read_blocks returns it."""
        self.pool[torch.tensor(block_ids, device=self.pool.device)] = data.to(self.pool.device)
