"""What a backend (nixl, ucx) provides to the generic Sink and Source: moving bytes and nothing
else. Handshake, leases, fencing and events live in sink.py / source.py / ledger.py, shared."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kv_transfer.ledger import SinkLedger

Run = tuple[int, int, int]  # (first source block id, first destination block id, num blocks)


def paired_runs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> list[Run]:
    """Coalesce pairwise block copies src[i] -> dst[i] into runs that are consecutive on both
    sides, in order; each run is one descriptor (nixl) or one message (ucx). With contiguous
    source blocks this is engine.kv_layout.block_runs(dst) split wherever src jumps.

        src  7 8 9 3 4      dst  20 21 40 41 42   ->   (7,20,2) (9,40,1) (3,41,2)
    """
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} slots")
    runs: list[Run] = []
    for s, d in zip(src_block_ids, dst_block_ids, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s0 + n == s and d0 + n == d:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


@dataclass(frozen=True, slots=True)
class Arrival:
    """A sink transport's report on one transfer: all its data is in place (error None), or it
    can no longer land because the bytes that came were wrong (error says why)."""

    generation: int
    agent: str  # the source that wrote it
    num_bytes: int
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """The pool as raw memory: what descriptors are made of. Derived from the tensor, so a CUDA
    pool is VRAM and a CPU pool is DRAM without anyone saying so."""

    base_address: int
    block_bytes: int
    num_blocks: int
    device_id: int  # CUDA ordinal; 0 for host memory
    memory: str  # "DRAM" | "VRAM" (NIXL's names)

    @classmethod
    def of(cls, pool: torch.Tensor, block_bytes: int) -> PoolInfo:
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be one contiguous tensor")
        cuda = pool.device.type == "cuda"
        return cls(
            base_address=pool.data_ptr(),
            block_bytes=block_bytes,
            num_blocks=pool.shape[0],
            device_id=(pool.device.index or 0) if cuda else 0,
            memory="VRAM" if cuda else "DRAM",
        )


def block_bytes_view(pool: torch.Tensor) -> torch.Tensor:
    """[num_blocks, block_bytes] uint8 view of the pool (no copy; any dtype, any device)."""
    return pool.view(torch.uint8).view(pool.shape[0], -1)


class SinkTransport(Protocol):
    one_sided: bool  # True: the source writes our memory and only it knows when it stopped

    def describe(self) -> dict[str, Any]:
        """What a source needs to reach us (sent in the welcome message); plain types."""
        ...

    def progress(self, ledger: SinkLedger) -> list[Arrival]:
        """Advance the transport; report transfers whose data is in place (or broken), and keep
        the ledger's transport_quiet flags current. Writes only into GRANTED transfers."""
        ...

    def wait_spec(self, ledger: SinkLedger) -> tuple[list[int], float | None]:
        """File descriptors to select on and the longest sleep before progress() is due."""
        ...

    def peer_gone(self, agent: str) -> None: ...

    def close(self) -> None: ...


class SourceTransport(Protocol):
    def describe(self) -> dict[str, Any]:
        """What a sink needs from us (sent in the hello message); plain types."""
        ...

    def add_peer(self, agent: str, info: dict[str, Any]) -> None:
        """Load a sink's description (raises HandshakeFailed if unusable)."""
        ...

    def remove_peer(self, agent: str) -> None: ...

    def post(self, agent: str, generation: int, src: np.ndarray, dst: np.ndarray) -> object:
        """Start writing blocks src[i] into the sink's blocks dst[i] (int64 arrays, checked by
        the caller: same length, distinct, inside the pools); returns an op for check()
        (raises TransferFailed). Runs consecutive on both sides may go as one descriptor."""
        ...

    def check(self, op: object) -> bool:
        """True once the op is over and the source memory is no longer read; raises
        TransferFailed (the op is then over too) if it failed."""
        ...

    def release(self, op: object) -> bool:
        """Forget an op that is over, or try to cancel one that is not; False if it is still
        running (call again later)."""
        ...

    def wait_spec(self, num_in_flight: int) -> tuple[list[int], float | None]: ...

    def close(self) -> None: ...
