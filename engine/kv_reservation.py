"""KVReservation: what the decode role's reserve_kv hands the worker (the doer of the write)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KVReservation:
    """The blocks reserved for a prompt whose KV another process computes.

    block_ids is the prompt's whole block table, in token order. Its first num_hit_blocks
    are this engine's own prefix-cache hits: full blocks that already hold the prompt's KV
    (acquired, read only; never leased to a sink, nobody writes them). The rest are new
    blocks the remote prefill writes. At most (num_prompt_tokens - 1) // block_size blocks
    hit, so at least the block of the last prompt token is always written.

    Ownership: the reservation holds one reference per entry of block_ids until exactly one
    of admit_prefilled (the request takes the table) or cancel_kv_reservation (frees it).
    """

    block_ids: tuple[int, ...]
    num_hit_blocks: int

    @property
    def write_block_ids(self) -> tuple[int, ...]:
        """The blocks the remote prefill must write: its blocks num_hit_blocks.. on."""
        return self.block_ids[self.num_hit_blocks :]
