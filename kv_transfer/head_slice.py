"""HeadSliceSource: ship one sink rank's kv heads out of a pool that holds all of them.

A prefill worker with TP 1 feeding a decode worker with TP T: sink rank r holds kv heads
[r*H/T, (r+1)*H/T) (KVLayout.shard). In our head-inner layout
`[block, layer, k|v, token, head, dim]` that slice of one block is strided: layers x 2 x
block_size rows of H/T x head_dim elements (Llama-3.1-8B bf16, T=2: 1,024 rows of 1 KiB per
2 MiB block), so writing it in place would cost ~1,000 NIXL descriptors per block. Instead:

  1. gather: the slice of the send's source blocks is copied into *staging blocks* laid out as
     rank r's pool (`[n, layer, 2, block_size, H/T, dim]`: one staging block is one destination
     block, contiguous), one strided device copy per run of consecutive source blocks, on a
     side stream (CUDA) that is synchronised before the post;
  2. write: an ordinary Source over the staging pool (its own agent) writes staging -> sink
     blocks with the usual protocol (claim, grant, fencing), one descriptor per run consecutive
     on both sides; staging blocks are handed out lowest-first, so a send's are usually one run.

Cost: one extra pass over the slice in device memory (block_bytes/T per block; ~2x the write's
bytes moved on the source GPU, microseconds per MiB at HBM speed) and the staging memory,
`staging_blocks` x block_bytes/T per sink rank. Ownership: a send takes its staging blocks in
send() (or waits, queued, until enough are free) and gives them back on its SendDone /
SendFailed, the only free path; the staging region is registered once, with the agent. A
SendDone's elapsed_s counts from send(): the staging wait and the gather are in it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    KVHandle,
    KVSource,
    SendDone,
    SendFailed,
    SourceEvent,
    TransferFailed,
)
from kv_transfer.transport import paired_runs


@dataclass(slots=True)
class _Queued:
    handle: KVHandle
    src: np.ndarray
    since: float  # send() time: a SendDone's elapsed_s counts the wait and the gather too


class HeadSliceSource:
    """A KVSource (base.KVSource) for the heads of sink rank `sink_rank` of `sink_tp`."""

    def __init__(
        self,
        kv: KVCache,
        sink_rank: int,
        sink_tp: int,
        staging_blocks: int,
        make_source: Callable[[KVCache], KVSource],
    ) -> None:
        """make_source(staging_kv): the backend's Source over the staging pool (registers it)."""
        layout = kv.layout.shard(sink_rank, sink_tp)  # raises if the heads do not divide
        per_rank = layout.num_kv_heads
        self._heads = slice(sink_rank * per_rank, (sink_rank + 1) * per_rank)
        self._pool = kv.pool
        self._staging = KVCache(replace(layout, num_blocks=staging_blocks), kv.pool.device)
        self._inner = make_source(self._staging)
        self._free = list(range(staging_blocks))  # ascending; a send takes the lowest ids
        # (transfer id, gen) -> its staging ids, and the seconds between its send() and the
        # inner send() (staging wait + gather), added to the inner SendDone's elapsed_s
        self._taken: dict[tuple[str, int], tuple[list[int], float]] = {}
        self._queue: deque[_Queued] = deque()  # sends waiting for staging blocks
        self._events: list[SourceEvent] = []
        self._stream = torch.cuda.Stream(kv.pool.device) if kv.pool.is_cuda else None

    @property
    def agent_name(self) -> str:
        return self._inner.agent_name

    def connect(self, sink_address: str, timeout_s: float = 10.0) -> None:
        self._inner.connect(sink_address, timeout_s)

    def prepare(self, handle: KVHandle) -> None:
        self._inner.prepare(handle)

    def cancel(self, handle: KVHandle) -> None:
        self._inner.cancel(handle)

    def send(self, handle: KVHandle, src_block_ids: Sequence[int]) -> None:
        src = np.asarray(src_block_ids, dtype=np.int64)
        if src.ndim != 1 or len(src) != len(handle.block_ids) or not len(src):
            raise ValueError(f"{len(src)} source blocks for {len(handle.block_ids)} slots")
        if len(src) > self._staging.layout.num_blocks:
            error = TransferFailed(
                f"{len(src)} blocks exceed the {self._staging.layout.num_blocks} staging blocks "
                "of a head-sliced send (raise --kv-staging-tokens)"
            )
            self._events.append(SendFailed(handle.transfer_id, handle.generation, error))
            return
        self._queue.append(_Queued(handle, src, time.monotonic()))
        self._start_queued()

    def poll(self, timeout_s: float = 0.0, wakeup_fd: int | None = None) -> list[SourceEvent]:
        if self._events:
            timeout_s = 0.0
        events = self._inner.poll(timeout_s, wakeup_fd)
        for i, e in enumerate(events):
            taken = self._taken.pop((e.transfer_id, e.generation), None)
            if taken is None:
                continue
            ids, before = taken
            self._free = sorted(self._free + ids)
            if isinstance(e, SendDone):
                events[i] = replace(e, elapsed_s=e.elapsed_s + before)
        if events:
            self._start_queued()
        out, self._events = [*self._events, *events], []
        return out

    def close(self) -> None:
        self._inner.close()

    def _start_queued(self) -> None:
        """Start queued sends in order while staging blocks suffice (FIFO: no overtaking)."""
        while self._queue and len(self._queue[0].src) <= len(self._free):
            q = self._queue.popleft()
            n = len(q.src)
            ids, self._free = self._free[:n], self._free[n:]
            try:
                self._gather(q.src, ids)
            except (RuntimeError, IndexError) as e:  # a bad source block id, a device error
                self._free = sorted(self._free + ids)
                error = TransferFailed(f"gathering heads {self._heads} failed: {e}")
                self._events.append(SendFailed(q.handle.transfer_id, q.handle.generation, error))
                continue
            before = time.monotonic() - q.since
            self._taken[(q.handle.transfer_id, q.handle.generation)] = (ids, before)
            self._inner.send(q.handle, ids)  # its SendDone/SendFailed gives the ids back

    def _gather(self, src: np.ndarray, staging_ids: list[int]) -> None:
        """staging[staging_ids[i]] = pool[src[i]][..., heads, :], one copy per paired run."""
        pool, staging, heads = self._pool, self._staging.pool, self._heads
        if int(src.min()) < 0 or int(src.max()) >= pool.shape[0]:
            raise IndexError(f"source block ids outside the pool of {pool.shape[0]}")
        if self._stream is None:
            for s, d, n in paired_runs(src.tolist(), staging_ids):
                staging[d : d + n].copy_(pool[s : s + n, :, :, :, heads])
            return
        # The engine finished computing these blocks before the request's last step returned
        # (its sampled token was read on the host), so a side stream may read them now.
        with torch.cuda.stream(self._stream):
            for s, d, n in paired_runs(src.tolist(), staging_ids):
                staging[d : d + n].copy_(pool[s : s + n, :, :, :, heads], non_blocking=True)
        self._stream.synchronize()  # NIXL reads staging through its own engine: bytes first
