"""Head-sliced sends between real processes over NIXL (kv_transfer/head_slice.py): a source
pool with all kv heads feeds two sink pools of one tensor-parallel decode worker, each holding
half of the heads (KVLayout.shard). Each sink rank's blocks must hold exactly its heads of the
source blocks, byte for byte; staging blocks and leases end exactly once on every side."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest

from engine.kv_layout import KVLayout
from tests.kv_transfer.conftest import LAYOUT
from tests.kv_transfer.peer import Peer, count

WORLD = 2
STAGING = 48  # blocks per sink rank: fewer than one plan below needs, so sends queue for it


def _shard(rank: int) -> dict[str, Any]:
    return asdict(KVLayout(**LAYOUT).shard(rank, WORLD))


@pytest.fixture(scope="module")
def peers() -> Iterator[dict[str, list[Peer]]]:
    sinks = [Peer("sink", "nixl", _shard(r)) for r in range(WORLD)]
    sources = [Peer("source", "nixl", LAYOUT, head_slice=[r, WORLD, STAGING]) for r in range(WORLD)]
    try:
        for p in (*sinks, *sources):
            p.ready()
        yield {"sinks": sinks, "sources": sources}
    finally:
        for p in (*sinks, *sources):
            p.stop()


def test_each_sink_rank_gets_its_heads_byte_for_byte(peers: dict[str, list[Peer]]) -> None:
    sinks, sources = peers["sinks"], peers["sources"]
    sizes = [20, 1, 33, 7]  # 61 blocks per rank through 48 staging blocks: some sends wait
    dst = sinks[0].call("pick", n=sum(sizes), scatter=True, avoid=[])["block_ids"]
    src = sources[0].call("pick", n=sum(sizes), scatter=True, avoid=[])["block_ids"]
    plans, at = [], 0
    for i, n in enumerate(sizes):
        d, s = dst[at : at + n], src[at : at + n]
        at += n
        for source in sources:  # both source peers hold the same full-head pool
            source.call("fill", block_ids=s, seed=i)
        handles = [
            sink.call("expect", tid=f"t{i}", block_ids=d, lease_s=30)["handle"] for sink in sinks
        ]
        plans.append({"tid": f"t{i}", "dst": d, "src": s, "handles": handles})
    for r, source in enumerate(sources):
        source.call("send", sends=[{"handle": p["handles"][r], "src": p["src"]} for p in plans])
    for r in range(WORLD):
        sinks[r].wait_events(lambda ev: count(ev, "KVLanded") == len(sizes))
        sources[r].wait_events(lambda ev: count(ev, "SendDone") == len(sizes))
    for p in plans:
        for r in range(WORLD):
            landed = sinks[r].call("digest", block_ids=p["dst"])["digests"]
            want = sources[r].call("digest_heads", block_ids=p["src"], rank=r, world=WORLD)
            assert landed == want["digests"], (p["tid"], r)
    # the two ranks' slices differ (the test would pass vacuously otherwise)
    assert sinks[0].call("digest", block_ids=dst[:1]) != sinks[1].call("digest", block_ids=dst[:1])
    for peer in (*sinks, *sources):
        account = peer.call("account")
        assert account["errors"] == [] and account["open"] == [], account
        for tid in account["admitted"]:
            peer.call("finish", tid=tid)


def test_a_head_slice_source_refuses_a_full_head_sink(peers: dict[str, list[Peer]]) -> None:
    """The handshake compares the slice's layout with the sink's: a TP=1 sink is refused."""
    sink = Peer("sink", "nixl", LAYOUT).ready()
    source = peers["sources"][0]  # sends heads 0..H/2 only
    try:
        handle = sink.call("expect", tid="x", block_ids=[1, 2], lease_s=30)["handle"]
        source.call("send", sends=[{"handle": handle, "src": [3, 4]}])
        [failed] = source.wait_events(lambda ev: len(ev) == 1)
        assert failed["kind"] == "SendFailed" and failed["error"] == "KVLayoutMismatch"
        assert "num_kv_heads: 2 != 1" in failed["message"], failed
        assert source.call("account")["errors"] == []
    finally:
        sink.stop()
