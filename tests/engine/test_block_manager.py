"""BlockManager and block hashes: unit tests, contiguity, LRU order, and a stateful model check."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_manager import BlockAccountingError, BlockManager, OutOfBlocks
from runtime import block_hash
from runtime.block_hash import hash_block_tokens, hash_request_blocks


def num_runs(block_ids: list[int]) -> int:
    """Contiguous ascending runs, i.e. network descriptors needed to ship these blocks."""
    return sum(1 for i, b in enumerate(block_ids) if i == 0 or b != block_ids[i - 1] + 1)


def snapshot(bm: BlockManager) -> tuple[int, int, int, int]:
    return bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks, bm.num_evictions


def run_request(bm: BlockManager, tokens: list[int]) -> list[int]:
    """Prefill one request the way the scheduler does: hits, then new blocks, then commits."""
    hashes = hash_request_blocks(tokens, bm.block_size)
    hits = bm.match_prefix(hashes)
    num_new = -(-len(tokens) // bm.block_size) - len(hits)
    assert bm.can_allocate(num_new, hits)
    bm.acquire(hits)
    table = hits + bm.allocate(num_new)
    for i in range(len(hits), len(hashes)):
        bm.commit(table[i], hashes[i])
    return table


# --- block hashes -------------------------------------------------------------------------------


def test_hash_format_is_pinned() -> None:
    # The router recomputes these hashes in another process: the format is a wire format.
    payload = b"\x00" + struct.pack("<5I", 4, 1, 2, 3, 4)
    expected = int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")
    assert hash_block_tokens(None, [1, 2, 3, 4]) == expected == 5629093472756045253
    chained = b"\x01" + expected.to_bytes(8, "little") + struct.pack("<5I", 4, 5, 6, 7, 8)
    second = int.from_bytes(hashlib.blake2b(chained, digest_size=8).digest(), "little")
    assert hash_request_blocks(list(range(1, 10)), 4) == [expected, second]
    assert hash_block_tokens(None, [1, 2, 3, 4], b"lora-7") == 6839304276066420738


def test_hash_is_deterministic_across_processes_and_stdlib_only() -> None:
    # -S: no site-packages, so the module must load (and hash) with the standard library alone,
    # as a torch-free router will; PYTHONHASHSEED differs per run, the hashes must not.
    code = (
        "import importlib.util as u, sys\n"
        f"spec = u.spec_from_file_location('block_hash', {block_hash.__file__!r})\n"
        "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.hash_request_blocks(list(range(40)), 16))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-S", "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert outputs == {f"{hash_request_blocks(list(range(40)), 16)}\n"}


def test_hash_depends_on_parent_tokens_and_extra() -> None:
    base = hash_block_tokens(None, [1, 2])
    assert len({base, hash_block_tokens(0, [1, 2]), hash_block_tokens(base, [1, 2])}) == 3
    assert hash_block_tokens(None, [2, 1]) != base
    assert hash_block_tokens(None, [1, 2], b"m") != base
    assert hash_block_tokens(None, [1], b"\x02\x00\x00\x00") != hash_block_tokens(None, [1, 2])
    assert 0 <= base < 2**64


def test_hash_rejects_values_outside_the_format() -> None:
    with pytest.raises(ValueError, match="uint32"):
        hash_block_tokens(None, [2**32])
    with pytest.raises(ValueError, match="uint32"):
        hash_block_tokens(None, [-1])
    with pytest.raises(ValueError, match="uint64"):
        hash_block_tokens(2**64, [1])
    with pytest.raises(ValueError, match="block_size"):
        hash_request_blocks([1, 2], 0)


def test_request_hashes_chain_and_skip_the_partial_tail() -> None:
    tokens = list(range(11))
    hashes = hash_request_blocks(tokens, 4)
    assert len(hashes) == 2
    assert hashes[1] == hash_block_tokens(hashes[0], tokens[4:8])
    assert hash_request_blocks(tokens[:3], 4) == []
    assert hash_request_blocks(tokens[4:8], 4, parent=hashes[0]) == hashes[1:]
    assert hash_request_blocks(tokens, 4, extra=b"x")[0] == hash_block_tokens(
        None, tokens[:4], b"x"
    )


# --- construction, allocate, contiguity ---------------------------------------------------------


def test_fresh_pool() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    assert (bm.num_blocks, bm.block_size) == (8, 4)
    assert snapshot(bm) == (8, 0, 0, 0)
    assert bm.usage() == 0.0
    bm.check_integrity(holders={})


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (-1, 4)])
def test_rejects_empty_pool_or_block(num_blocks: int, block_size: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BlockManager(num_blocks, block_size)


def test_allocate_on_fresh_pool_returns_lowest_ids_in_order() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    assert bm.allocate(5) == list(range(5))
    assert bm.allocate(3) == [5, 6, 7]
    assert bm.allocate(0) == []
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage()) == (8, 8, 0.5)
    bm.check_integrity(holders={"a": list(range(5)), "b": [5, 6, 7]})


def test_allocate_after_frees_is_ascending_with_few_runs() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    tables = {name: bm.allocate(4) for name in "abcd"}
    bm.free(tables.pop("b"))
    bm.free(tables.pop("d"))
    tables["e"] = bm.allocate(6)
    assert tables["e"] == [4, 5, 6, 7, 12, 13]
    assert num_runs(tables["e"]) == 2
    bm.free(tables.pop("a"))
    tables["f"] = bm.allocate(5)
    assert tables["f"] == [0, 1, 2, 3, 14]
    bm.check_integrity(holders=tables)


def test_allocate_sorts_evicted_blocks_too() -> None:
    bm = BlockManager(num_blocks=6, block_size=1)
    table = run_request(bm, [10, 11, 12, 13, 14, 15])
    bm.free(table)  # evictable, tail first: 5, 4, 3, 2, 1, 0
    assert bm.allocate(4) == [2, 3, 4, 5]
    assert bm.num_evictions == 4


def test_allocate_too_many_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = run_request(bm, [1, 2, 3, 4])
    bm.free(table[1:])  # one evictable block
    before = snapshot(bm)
    with pytest.raises(OutOfBlocks, match=r"asked for 4 blocks; 2 free \+ 1 evictable of 4"):
        bm.allocate(4)
    assert snapshot(bm) == before
    assert bm.match_prefix(hash_request_blocks([1, 2, 3, 4], 2)) == table
    with pytest.raises(ValueError, match=">= 0"):
        bm.allocate(-1)
    bm.check_integrity(holders={"a": table[:1]})


# --- commit, match_prefix, acquire, can_allocate -------------------------------------------------


def test_commit_makes_block_findable_and_match_stops_at_first_miss() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    h = hash_request_blocks([1, 2, 3, 4, 5, 6], 2)
    table = bm.allocate(3)
    bm.commit(table[0], h[0])
    bm.commit(table[2], h[2])
    assert bm.num_cached_blocks == 2
    assert bm.match_prefix(h) == table[:1]
    assert bm.match_prefix(h[1:]) == []
    bm.commit(table[1], h[1])
    assert bm.match_prefix(h) == table
    assert bm.match_prefix([]) == []


def test_commit_of_a_duplicate_hash_keeps_the_first_block() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    [h] = hash_request_blocks([7, 7], 2)
    first, second = bm.allocate(2)
    bm.commit(first, h)
    bm.commit(second, h)
    assert bm.match_prefix([h]) == [first]
    assert bm.num_cached_blocks == 1
    bm.free([second])  # unhashed, so straight back to the free pool
    assert bm.allocate(1) == [second]
    assert bm.num_evictions == 0
    bm.check_integrity(holders={"a": [first], "b": [second]})


def test_commit_errors() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    [block] = bm.allocate(1)
    bm.commit(block, 1)
    with pytest.raises(ValueError, match="already carries a hash"):
        bm.commit(block, 2)
    with pytest.raises(ValueError, match="not in use"):
        bm.commit(3, 2)
    with pytest.raises(ValueError, match="outside"):
        bm.commit(4, 2)
    assert bm.match_prefix([1, 2]) == [block]


def test_match_prefix_is_pure_and_does_not_refresh_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    old = run_request(bm, [1])
    new = run_request(bm, [2])
    bm.free(old)
    bm.free(new)
    before = snapshot(bm)
    assert bm.match_prefix(hash_request_blocks([1], 1)) == old
    assert snapshot(bm) == before
    bm.allocate(3)  # evicts one block: old, still the least recently freed
    assert bm.match_prefix(hash_request_blocks([1], 1)) == []
    assert bm.match_prefix(hash_request_blocks([2], 1)) == new


def test_acquire_takes_evictable_block_out_of_the_lru() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    table = run_request(bm, [1, 2, 3, 4])
    bm.free(table)
    assert bm.num_free_blocks == 3
    hits = bm.match_prefix(hash_request_blocks([1, 2, 3, 4], 2))
    bm.acquire(hits[:1])
    assert (bm.num_free_blocks, bm.num_used_blocks) == (2, 1)
    assert bm.allocate(2) == [table[1], 2]  # the acquired head block is never evicted
    assert bm.match_prefix(hash_request_blocks([1, 2, 3, 4], 2)) == table[:1]
    bm.check_integrity(holders={"a": table[:1], "b": [table[1], 2]})


def test_acquire_shares_used_blocks_and_rejects_free_ones_atomically() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = bm.allocate(2)
    bm.acquire(table)  # a fork shares even unhashed, used blocks
    bm.check_integrity(holders={"parent": table, "child": table})
    with pytest.raises(ValueError, match="free, uncached block 3"):
        bm.acquire([table[0], 3])
    with pytest.raises(ValueError, match="outside"):
        bm.acquire([-1])
    bm.check_integrity(holders={"parent": table, "child": table})


def test_can_allocate_counts_evictable_hits_once() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    table = run_request(bm, [1, 2])
    bm.free(table)
    assert bm.num_free_blocks == 4
    assert bm.can_allocate(4)
    assert not bm.can_allocate(3, table)
    assert bm.can_allocate(2, table)
    assert bm.can_allocate(2, [table[0], table[0], table[1]])
    assert not bm.can_allocate(5)
    assert bm.can_allocate(0, ())
    with pytest.raises(ValueError, match="uncached"):
        bm.can_allocate(0, [3])
    with pytest.raises(ValueError, match=">= 0"):
        bm.can_allocate(-1)
    bm.acquire(table)
    assert bm.allocate(2) == [2, 3]


# --- free, LRU eviction, prefix hits after a request finished -----------------------------------


def test_prefix_hit_after_request_finished() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(100, 110))  # two full blocks and a partial tail
    first = run_request(bm, prompt)
    bm.free(first)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2
    second = run_request(bm, [*prompt[:8], 1, 2, 3])
    assert second[:2] == first[:2]  # both full blocks hit
    assert bm.num_evictions == 0
    bm.check_integrity(holders={"b": second})
    bm.free(second)
    bm.check_integrity(holders={})


def test_eviction_is_lru_and_tail_first_within_a_request() -> None:
    bm = BlockManager(num_blocks=6, block_size=1)
    older = run_request(bm, [1, 2, 3])
    newer = run_request(bm, [4, 5, 6])
    bm.free(older)
    bm.free(newer)
    evicted = [bm.allocate(1)[0] for _ in range(6)]
    assert evicted == older[::-1] + newer[::-1]
    assert bm.num_evictions == 6 and bm.num_cached_blocks == 0


def test_evicted_block_drops_its_hash_and_breaks_the_chain() -> None:
    bm = BlockManager(num_blocks=3, block_size=1)
    table = run_request(bm, [1, 2, 3])
    bm.free(table)
    bm.allocate(1)  # evicts the tail block
    assert bm.match_prefix(hash_request_blocks([1, 2, 3], 1)) == table[:2]
    bm.allocate(1)  # then the middle one
    assert bm.match_prefix(hash_request_blocks([1, 2, 3], 1)) == table[:1]


def test_refreed_hit_moves_to_the_recent_end() -> None:
    bm = BlockManager(num_blocks=2, block_size=1)
    a, b = run_request(bm, [1]), run_request(bm, [2])
    bm.free(a)
    bm.free(b)
    bm.acquire(a)
    bm.free(a)  # a is now more recently freed than b
    assert bm.allocate(1) == b


def test_shared_block_is_freed_only_by_its_last_holder() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    first = run_request(bm, [1, 2, 3])
    second = run_request(bm, [1, 2, 9])
    assert first[0] == second[0]
    bm.free(first)
    assert bm.num_used_blocks == 2
    bm.check_integrity(holders={"second": second})


def test_double_free_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = run_request(bm, [1, 2, 3, 4])
    other = bm.allocate(1)
    bm.free(table)
    before = snapshot(bm)
    with pytest.raises(ValueError, match="double free of block"):
        bm.free(other + table)  # other is valid; validation runs before any decrement
    with pytest.raises(ValueError, match="double free of block"):
        bm.free(other + other)
    with pytest.raises(ValueError, match="outside"):
        bm.free([*other, 99])
    assert snapshot(bm) == before
    bm.check_integrity(holders={"other": other})


def test_free_without_prefix_caching_returns_blocks_to_the_pool() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    table = run_request(bm, [1, 2, 3, 4])
    assert bm.num_cached_blocks == 0
    bm.free(table)
    assert bm.match_prefix(hash_request_blocks([1, 2, 3, 4], 2)) == []
    assert bm.allocate(4) == [0, 1, 2, 3]
    assert bm.num_evictions == 0


def test_reset_prefix_cache_drops_only_evictable_hashes() -> None:
    bm = BlockManager(num_blocks=4, block_size=1)
    kept = run_request(bm, [1])
    dropped = run_request(bm, [2, 3])
    bm.free(dropped)
    assert bm.reset_prefix_cache() == 2
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(hash_request_blocks([1], 1)) == kept
    assert bm.match_prefix(hash_request_blocks([2], 1)) == []
    assert bm.allocate(3) == [1, 2, 3]
    assert bm.num_evictions == 0
    assert bm.reset_prefix_cache() == 0


# --- check_integrity ---------------------------------------------------------------------------


def test_integrity_catches_holder_mismatches() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    table = bm.allocate(2)
    bm.check_integrity(holders={"a": table})
    with pytest.raises(BlockAccountingError, match=r"block 1 has ref_count 1 but no holder"):
        bm.check_integrity(holders={"a": table[:1]})
    with pytest.raises(BlockAccountingError, match=r"block 3 is free but \['a'\] hold 1"):
        bm.check_integrity(holders={"a": [*table, 3]})
    with pytest.raises(BlockAccountingError, match=r"block 0 has ref_count 1 but \['a', 'b'\]"):
        bm.check_integrity(holders={"a": table, "b": table[:1]})
    with pytest.raises(BlockAccountingError, match="outside the pool"):
        bm.check_integrity(holders={"a": [*table, 7]})


def test_integrity_catches_corrupted_internals() -> None:
    # The only test that reaches into private state: it proves the checker sees each break.
    bm = BlockManager(num_blocks=4, block_size=2)
    table = run_request(bm, [1, 2, 3, 4])
    bm._free_ids.append(table[0])
    with pytest.raises(BlockAccountingError, match="free block 0 has ref_count 1") as err:
        bm.check_integrity()
    assert "!= num_blocks 4" in str(err.value)
    bm._free_ids.pop()
    bm._ref_counts[3] = -1
    with pytest.raises(BlockAccountingError, match="negative ref_count"):
        bm.check_integrity()
    bm._ref_counts[3] = 0
    bm._hash_to_block[12345] = table[1]
    with pytest.raises(BlockAccountingError, match="maps to block 1, which lacks it"):
        bm.check_integrity()
    del bm._hash_to_block[12345]
    bm.check_integrity(holders={"a": table})


# --- stateful model check -----------------------------------------------------------------------

BLOCK_SIZE = 2
NUM_BLOCKS = 10
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=8)  # tiny alphabet: many shared prefixes


class BlockManagerMachine(RuleBasedStateMachine):
    """Requests prefill, grow, finish and misbehave against an O(n) reference model.

    The model predicts exactly which blocks allocate() returns (lowest free ids, then the least
    recently freed cached ones) and what match_prefix() finds, so any divergence in pools,
    LRU order or hashes shows up at the next step.
    """

    enable_prefix_caching = True

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE, self.enable_prefix_caching)
        self.tokens: dict[str, list[int]] = {}
        self.tables: dict[str, list[int]] = {}
        self.num_committed: dict[str, int] = {}
        self.content: dict[int, tuple[int, ...]] = {}  # hashed block -> token prefix it ends
        self.lru: list[int] = []  # evictable blocks, least recently freed first
        self.num_requests = 0

    # -- model helpers --
    def held(self) -> set[int]:
        return {b for table in self.tables.values() for b in table}

    def model_free(self) -> list[int]:
        return sorted(set(range(NUM_BLOCKS)) - self.held() - set(self.lru))

    def model_match(self, tokens: list[int]) -> list[int]:
        by_prefix = {prefix: b for b, prefix in self.content.items()}
        hits: list[int] = []
        for end in range(BLOCK_SIZE, len(tokens) + 1, BLOCK_SIZE):
            if tuple(tokens[:end]) not in by_prefix:
                break
            hits.append(by_prefix[tuple(tokens[:end])])
        return hits

    def allocate(self, num_new: int) -> list[int]:
        free = self.model_free()
        num_evicted = max(0, num_new - len(free))
        expected = sorted(free[:num_new] + self.lru[:num_evicted])
        for block_id in self.lru[:num_evicted]:
            del self.content[block_id]
        del self.lru[:num_evicted]
        new = self.bm.allocate(num_new)
        assert new == expected
        assert not set(new) & self.held(), "allocate returned a block someone holds"
        return new

    def commit_full_blocks(self, request_id: str) -> None:
        tokens, table = self.tokens[request_id], self.tables[request_id]
        hashes = hash_request_blocks(tokens, BLOCK_SIZE)
        for i in range(self.num_committed[request_id], len(hashes)):
            prefix = tuple(tokens[: (i + 1) * BLOCK_SIZE])
            self.bm.commit(table[i], hashes[i])
            if self.enable_prefix_caching and prefix not in self.content.values():
                self.content[table[i]] = prefix
        self.num_committed[request_id] = len(hashes)

    # -- rules --
    @precondition(lambda self: len(self.tables) < 4)  # else few requests would ever finish
    @rule(tokens=TOKENS, commit=st.booleans())
    def start_request(self, tokens: list[int], commit: bool) -> None:
        hits = self.bm.match_prefix(hash_request_blocks(tokens, BLOCK_SIZE))
        assert hits == self.model_match(tokens)
        for i, block_id in enumerate(hits):
            assert self.content[block_id] == tuple(tokens[: (i + 1) * BLOCK_SIZE])
        num_new = -(-len(tokens) // BLOCK_SIZE) - len(hits)
        revived = {b for b in hits if b in self.lru}
        fits = num_new <= len(self.model_free()) + len(self.lru) - len(revived)
        assert self.bm.can_allocate(num_new, hits) == fits
        if not fits:
            return
        self.bm.acquire(hits)
        self.lru = [b for b in self.lru if b not in revived]
        request_id = f"r{self.num_requests}"
        self.num_requests += 1
        self.tables[request_id] = hits  # held before allocate: the model must not hand them out
        self.tables[request_id] = hits + self.allocate(num_new)
        self.tokens[request_id] = tokens
        self.num_committed[request_id] = len(hits)
        if commit:
            self.commit_full_blocks(request_id)

    @precondition(lambda self: self.tables)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(0, 1), min_size=1, max_size=3))
    def grow_request(self, data: st.DataObject, new_tokens: list[int]) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.tables)))
        tokens = self.tokens[request_id] + new_tokens
        num_new = -(-len(tokens) // BLOCK_SIZE) - len(self.tables[request_id])
        if not self.bm.can_allocate(num_new):
            return
        self.tables[request_id] += self.allocate(num_new)
        self.tokens[request_id] = tokens
        self.commit_full_blocks(request_id)

    @precondition(lambda self: self.tables)
    @rule(data=st.data())
    def finish_request(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.tables)))
        table = self.tables.pop(request_id)
        del self.tokens[request_id], self.num_committed[request_id]
        self.bm.free(table)
        still_held = self.held()
        for block_id in reversed(table):
            if block_id in self.content and block_id not in still_held:
                self.lru.append(block_id)

    @rule(data=st.data(), over_free_held=st.booleans())
    def double_free_changes_nothing(self, data: st.DataObject, over_free_held: bool) -> None:
        held = sorted(self.held())
        if over_free_held and held:  # one entry more than the block's holders have
            victim = data.draw(st.sampled_from(held))
            block_ids = [victim] * (1 + sum(t.count(victim) for t in self.tables.values()))
        else:  # a block nobody holds, after a valid entry that must not be freed either
            unheld = sorted(set(range(NUM_BLOCKS)) - set(held))
            if not unheld:
                return
            valid = data.draw(st.lists(st.sampled_from(held), max_size=1)) if held else []
            block_ids = [*valid, data.draw(st.sampled_from(unheld))]
        before = snapshot(self.bm)
        with pytest.raises(ValueError, match="double free"):
            self.bm.free(block_ids)
        assert snapshot(self.bm) == before  # ref counts: checked against holders by the invariant

    @rule()
    def allocate_too_many_changes_nothing(self) -> None:
        before = snapshot(self.bm)
        with pytest.raises(OutOfBlocks):
            self.bm.allocate(self.bm.num_free_blocks + 1)
        assert snapshot(self.bm) == before

    @rule(tokens=TOKENS)
    def probe_is_pure(self, tokens: list[int]) -> None:
        before = snapshot(self.bm)
        assert self.bm.match_prefix(hash_request_blocks(tokens, BLOCK_SIZE)) == self.model_match(
            tokens
        )
        assert snapshot(self.bm) == before

    @precondition(lambda self: len(self.lru) >= 4)  # rarer, so that the cache fills up
    @rule()
    def reset_prefix_cache(self) -> None:
        assert self.bm.reset_prefix_cache() == len(self.lru)
        for block_id in self.lru:
            del self.content[block_id]
        self.lru = []

    @invariant()
    def accounting_matches_model(self) -> None:
        self.bm.check_integrity(holders=self.tables)
        held = self.held()
        assert self.bm.num_used_blocks == len(held)
        assert self.bm.num_free_blocks == NUM_BLOCKS - len(held)
        assert self.bm.num_cached_blocks == len(self.content)
        assert self.bm.usage() == len(held) / NUM_BLOCKS


class BlockManagerNoCachingMachine(BlockManagerMachine):
    enable_prefix_caching = False


BlockManagerMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None
)
BlockManagerNoCachingMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerNoCachingMachine = BlockManagerNoCachingMachine.TestCase


def test_drain_events_reports_net_prefix_cache_changes() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    (a,) = bm.allocate(1)
    bm.commit(a, 111)
    assert bm.drain_events() == ([111], [])
    assert bm.drain_events() == ([], [])
    bm.free([a])
    bm.allocate(2)  # evicts block a, dropping hash 111
    assert bm.drain_events() == ([], [111])
    bm.free([0, 1])
    (b,) = bm.allocate(1)
    bm.commit(b, 222)
    bm.free([b])
    bm.allocate(2)  # 222 stored and evicted within one window: net removed
    assert bm.drain_events() == ([], [222])
