"""ShardedSink (a TP=2 decode worker's sink) over two real NIXL sinks, one per rank's pool shard,
fed by two source processes (one per rank, as a TP=2 prefill worker): the request is admitted only
once every rank's part landed, and an abort while one rank's write is still in flight (held by
the source's gate) frees the blocks only once that rank's fence lets go, with no lease left on
either rank."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch

from engine.kv_cache import KVCache
from engine.kv_layout import KVLayout
from kv_transfer import registry
from kv_transfer.base import KVLanded, KVLost, ReleaseReason
from kv_transfer.endpoint_thread import SinkThread
from kv_transfer.sharded import ShardedSink
from tests.kv_transfer.conftest import LAYOUT
from tests.kv_transfer.peer import CHILD_ENV, Peer, count

WORLD = 2


def _shard(rank: int) -> dict[str, Any]:
    return asdict(KVLayout(**LAYOUT).shard(rank, WORLD))


@pytest.fixture(scope="module")
def sources() -> Iterator[list[Peer]]:
    peers = [Peer("source", "nixl", _shard(r)) for r in range(WORLD)]
    try:
        for p in peers:
            p.ready()
        yield peers
    finally:
        for p in peers:
            p.stop()


async def _held(source: Peer, n: int) -> None:
    deadline = time.monotonic() + 10
    while source.call("held")["held"] < n:
        assert time.monotonic() < deadline, "the gated write never came"
        await asyncio.sleep(0.01)


def test_abort_with_one_rank_in_flight_waits_for_that_rank(sources: list[Peer]) -> None:
    os.environ.update(CHILD_ENV)  # this process's NIXL agents: loopback only

    async def run() -> None:
        loop = asyncio.get_running_loop()
        kvs = [KVCache(KVLayout(**_shard(r)), torch.device("cpu")) for r in range(WORLD)]
        ranks = [SinkThread(registry.make_sink("nixl", kv), loop) for kv in kvs]
        sink = ShardedSink(ranks)
        try:
            blocks, src = [3, 4, 5, 9], [20, 21, 22, 30]
            # 1. both parts land: admitted, with every rank's bytes
            handle = await sink.expect("ok", blocks, 30)
            assert handle.sink_tp == 2 and handle.rank(1).sink_address != handle.sink_address
            for r, s in enumerate(sources):
                s.call("fill", block_ids=src, seed=r)
                s.call("send", sends=[{"handle": handle.rank(r).to_wire(), "src": src}])
            landed = await asyncio.wait_for(sink.outcome("ok"), 10)
            assert isinstance(landed, KVLanded)
            assert landed.num_bytes == len(blocks) * KVLayout(**LAYOUT).block_bytes
            for r, s in enumerate(sources):
                s.wait_events(lambda ev: count(ev, "SendDone") == 1)
                raw = kvs[r].pool.view(torch.uint8).view(len(kvs[r].pool), -1)
                landed_digest = s.call("digest", block_ids=src)["digests"]
                here = [hashlib.blake2b(raw[b].numpy().tobytes()).hexdigest() for b in blocks]
                assert here == landed_digest, r
            # 2. rank 1's write held in flight: rank 0 lands, the request is not admitted
            handle = await sink.expect("cut", blocks, 30)
            sources[1].call("gate", open=False)
            for r, s in enumerate(sources):
                s.call("send", sends=[{"handle": handle.rank(r).to_wire(), "src": src}])
            await _held(sources[1], 1)
            sources[0].wait_events(lambda ev: count(ev, "SendDone") == 1)
            outcome = asyncio.ensure_future(sink.outcome("cut"))
            await asyncio.sleep(0.3)
            assert not outcome.done()
            await sink.abort("cut")  # the client went away
            lost = await asyncio.wait_for(outcome, 5)
            assert isinstance(lost, KVLost) and lost.reason is ReleaseReason.ABORTED
            released = asyncio.ensure_future(sink.released("cut"))
            await asyncio.sleep(0.3)
            assert not released.done()  # rank 1's write may still land: its blocks are fenced
            sources[1].call("gate", open=True)
            rel = await asyncio.wait_for(released, 10)
            assert rel.block_ids == tuple(blocks)
            [failed] = sources[1].wait_events(lambda ev: len(ev) == 1)
            assert failed["kind"] == "SendFailed" and failed["error"] == "TransferAborted"
            # 3. no lease left on any rank: the same blocks lease again on both
            assert [r.endpoint.num_open for r in ranks] == [0, 0]  # type: ignore[attr-defined]
            await sink.expect("again", blocks, 30)
            await sink.abort("again")
            await sink.settled("again")
            assert not sink.is_open("again")
        finally:
            sink.close()

    asyncio.run(run())
    for s in sources:
        account = s.call("account")
        assert account["errors"] == [] and account["open"] == [], account
