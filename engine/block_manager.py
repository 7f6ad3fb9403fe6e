"""BlockManager: ownership accounting of the KV block ids of one paged pool. Pure Python, no torch.

It owns, per block id, a reference count and an optional prefix-cache hash. Callers own block
tables (list[int], one per request); every reference a table holds was taken by exactly one
allocate() or acquire() and is dropped by exactly one free(). Single-threaded: only the
scheduler, on the engine thread, calls it.

Each block is in exactly one state:

    state       ref_count  hash   kept in                 left by
    free        0          none   _free_ids (min-heap)    allocate()
    evictable   0          yes    _evictable (LRU order)  acquire() (a hit), allocate() (eviction)
    used        >= 1       maybe  the callers' tables     free() down to ref_count 0

A hash names the KV content of a full block together with all blocks before it (see
engine/block_hash.py), so a hash match is a prefix match. _hash_to_block and _block_hashes are
two views of one map and always agree; at most one block carries a given hash.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


class OutOfBlocks(RuntimeError):
    """allocate() was asked for more blocks than are free or evictable. Nothing was changed."""


class BlockAccountingError(RuntimeError):
    """check_integrity() found a broken invariant: a leaked, doubly owned or mis-hashed block."""


@dataclass(frozen=True, slots=True)
class BlockCounts:
    """Blocks per state, each counted on its own: free + cached + used == total always."""

    num_free: int  # ref_count 0, no hash
    num_cached: int  # ref_count 0, hashed: evictable prefix-cache content
    num_used: int  # ref_count >= 1
    num_total: int

    @property
    def balanced(self) -> bool:
        return self.num_free + self.num_cached + self.num_used == self.num_total


class BlockManager:
    """Reference counts, prefix-cache hashes and LRU eviction for block ids 0..num_blocks-1."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks {num_blocks} and block_size {block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size  # tokens per block; only callers use it
        self.enable_prefix_caching = enable_prefix_caching
        self.num_evictions = 0  # cached blocks whose hash allocate() dropped to reuse them, total
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Lowest ids first keeps one request's blocks in few contiguous runs: each run costs one
        # network descriptor when its KV is shipped to another process. range(n) is a heap.
        self._free_ids = list(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently freed first
        # Prefix-cache changes since the last drain_events(), for prefix-aware routers:
        # hash -> True (now stored) / False (now removed); the last change wins.
        self._hash_events: dict[int, bool] = {}
        # Blocks with ref_count >= 1, kept by the 0 <-> 1 transitions: counted apart from the
        # two pools so that `counts()` can show a block lost or in two places.
        self._num_used = 0

    def counts(self) -> BlockCounts:
        """O(1); `check_integrity` recounts everything from the ref counts."""
        return BlockCounts(
            len(self._free_ids), len(self._evictable), self._num_used, self.num_blocks
        )

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out now: free plus evictable."""
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref_count >= 1."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks carrying a hash, used or evictable."""
        return len(self._hash_to_block)

    def usage(self) -> float:
        """Fraction of the pool in use, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_blocks

    def match_prefix(self, block_hashes: Iterable[int]) -> list[int]:
        """Block ids for the longest cached run block_hashes[0..k); reads the hashes in order
        and no further than the first miss (a lazy iterable is hashed that far). Mutates nothing.

        The hits stay evictable until acquire(): call can_allocate/acquire before any allocate.
        """
        if not self.enable_prefix_caching:
            return []
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._hash_to_block.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def can_allocate(self, num_new_blocks: int, hit_block_ids: Sequence[int] = ()) -> bool:
        """Whether acquire(hit_block_ids) then allocate(num_new_blocks) would succeed. Pure.

        An evictable hit stops counting as allocatable once acquired. Raises ValueError for a
        hit acquire() would reject: that is a caller bug, not a lack of blocks.
        """
        if num_new_blocks < 0:
            raise ValueError(f"num_new_blocks must be >= 0, got {num_new_blocks}")
        for block_id in hit_block_ids:
            self._check_acquirable(block_id)
        num_revived = len({b for b in hit_block_ids if self._ref_counts[b] == 0})
        return num_new_blocks <= self.num_free_blocks - num_revived

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block (prefix-cache hits; a table shared by a fork).

        An evictable block leaves the LRU. Each reference is dropped by one free() entry.
        Raises ValueError, changing nothing, if a block is out of range or free and unhashed.
        """
        for block_id in block_ids:
            self._check_acquirable(block_id)
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
                self._num_used += 1
            self._ref_counts[block_id] += 1

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out num_blocks unhashed blocks with ref_count 1, in ascending id order.

        Takes the lowest free ids first, then evicts the least recently freed cached blocks
        (dropping their hashes). Raises OutOfBlocks, changing nothing, if too few are left.
        O(n log n) for n = num_blocks.
        """
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocks(
                f"asked for {num_blocks} blocks; {len(self._free_ids)} free + "
                f"{len(self._evictable)} evictable of {self.num_blocks}"
            )
        num_from_free = min(num_blocks, len(self._free_ids))
        block_ids = [heapq.heappop(self._free_ids) for _ in range(num_from_free)]
        for _ in range(num_blocks - num_from_free):
            block_id, _ = self._evictable.popitem(last=False)
            self._drop_hash(block_id)
            block_ids.append(block_id)
        self.num_evictions += num_blocks - num_from_free
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        self._num_used += num_blocks
        block_ids.sort()  # the evicted tail comes in LRU order
        return block_ids

    def commit(self, block_id: int, block_hash: int) -> None:
        """Make a full used block, whose KV is now computed, findable under block_hash.

        If another block already carries block_hash it keeps it (the first writer wins; nobody
        re-points hits that may be in flight) and block_id stays unhashed, so its free() returns
        it straight to the free pool. A no-op when prefix caching is off. Raises ValueError if
        block_id is out of range, has ref_count 0, or already carries a hash.
        """
        self._check_in_range(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"commit of block {block_id}, which is not in use (ref_count 0)")
        if self._block_hashes[block_id] is not None:
            raise ValueError(f"commit of block {block_id}, which already carries a hash")
        if not self.enable_prefix_caching or block_hash in self._hash_to_block:
            return
        self._hash_to_block[block_hash] = block_id
        self._block_hashes[block_id] = block_hash
        self._hash_events[block_hash] = True

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per entry of block_ids: a request's whole table, in table order.

        At ref_count 0 a hashed block becomes evictable and an unhashed one free. The table is
        walked in reverse so that a request's tail blocks are evicted before its head blocks,
        which other requests are likelier to share. Raises ValueError, changing nothing, on a
        double free (more entries for a block than its ref_count) or an id out of range.
        """
        for block_id, num_entries in Counter(block_ids).items():
            self._check_in_range(block_id)
            if num_entries > self._ref_counts[block_id]:
                raise ValueError(
                    f"double free of block {block_id}: {num_entries} entries, "
                    f"ref_count {self._ref_counts[block_id]}"
                )
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            self._num_used -= 1
            if self._block_hashes[block_id] is None:
                heapq.heappush(self._free_ids, block_id)
            else:
                self._evictable[block_id] = None

    def reset_prefix_cache(self) -> int:
        """Drop the hashes of all evictable blocks, which become free; returns how many.

        Used blocks keep their hashes: requests still write into or read from them.
        """
        num_dropped = len(self._evictable)
        for block_id in self._evictable:
            self._drop_hash(block_id)
            heapq.heappush(self._free_ids, block_id)
        self._evictable.clear()
        return num_dropped

    def cached_hashes(self) -> list[int]:
        """Every block hash in the prefix cache now (used and evictable blocks)."""
        return list(self._hash_to_block)

    def drain_events(self) -> tuple[list[int], list[int]]:
        """Net (stored, removed) block hashes since the last call; clears them.

        Net: a hash stored then evicted in between is only in `removed`, and the reverse only in
        `stored`, so applying either list in any order gives the cache's current state.
        """
        events, self._hash_events = self._hash_events, {}
        stored = [h for h, present in events.items() if present]
        return stored, [h for h, present in events.items() if not present]

    def check_integrity(self, holders: Mapping[str, Sequence[int]] | None = None) -> None:
        """Raise BlockAccountingError listing every broken invariant. Pure; O(num_blocks).

        holders maps request_id to block table; when given, each block's ref_count must equal
        the number of table entries naming it. For tests and debug checks, not the step path.
        """
        problems: list[str] = []
        refs = self._ref_counts
        problems += [f"block {b} has negative ref_count {r}" for b, r in enumerate(refs) if r < 0]
        for block_id, num_entries in Counter(self._free_ids).items():
            if num_entries > 1:
                problems.append(f"block {block_id} is in the free pool {num_entries} times")
            if block_id in self._evictable:
                problems.append(f"block {block_id} is both free and evictable")
            if refs[block_id] != 0 or self._block_hashes[block_id] is not None:
                problems.append(f"free block {block_id} has ref_count {refs[block_id]} or a hash")
        for block_id in self._evictable:
            if refs[block_id] != 0 or self._block_hashes[block_id] is None:
                problems.append(
                    f"evictable block {block_id} has ref_count {refs[block_id]} or no hash"
                )
        num_used = sum(1 for r in refs if r > 0)
        if num_used != self._num_used:
            problems.append(f"{num_used} blocks have a ref_count, {self._num_used} counted used")
        if len(self._free_ids) + len(self._evictable) + num_used != self.num_blocks:
            problems.append(
                f"free {len(self._free_ids)} + evictable {len(self._evictable)} + used {num_used}"
                f" != num_blocks {self.num_blocks} (a block is lost or in two pools)"
            )
        for block_hash, block_id in self._hash_to_block.items():
            if self._block_hashes[block_id] != block_hash:
                problems.append(f"hash {block_hash:#x} maps to block {block_id}, which lacks it")
        for block_id, carried in enumerate(self._block_hashes):
            if carried is not None and self._hash_to_block.get(carried) != block_id:
                problems.append(f"block {block_id} carries hash {carried:#x}, unmapped")
        if holders is not None:
            problems += self._holder_problems(holders)
        if problems:
            raise BlockAccountingError("; ".join(problems))

    def _holder_problems(self, holders: Mapping[str, Sequence[int]]) -> list[str]:
        problems: list[str] = []
        num_entries = Counter(b for table in holders.values() for b in table)
        for block_id, count in sorted(num_entries.items()):
            if not 0 <= block_id < self.num_blocks:
                problems.append(f"holders name block {block_id}, outside the pool")
            elif self._ref_counts[block_id] != count:
                names = sorted(r for r, table in holders.items() if block_id in table)
                ref_count = self._ref_counts[block_id]
                state = "is free" if ref_count == 0 else f"has ref_count {ref_count}"
                problems.append(f"block {block_id} {state} but {names} hold {count} entries for it")
        for block_id, ref_count in enumerate(self._ref_counts):
            if ref_count > 0 and block_id not in num_entries:
                problems.append(f"block {block_id} has ref_count {ref_count} but no holder (leak)")
        return problems

    def _check_in_range(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside 0..{self.num_blocks - 1}")

    def _check_acquirable(self, block_id: int) -> None:
        self._check_in_range(block_id)
        if self._ref_counts[block_id] == 0 and self._block_hashes[block_id] is None:
            raise ValueError(f"acquire of free, uncached block {block_id} (a stale prefix hit?)")

    def _drop_hash(self, block_id: int) -> None:
        block_hash = self._block_hashes[block_id]
        if block_hash is not None:
            del self._hash_to_block[block_hash]
            self._block_hashes[block_id] = None
            self._hash_events[block_hash] = False
