"""Cancellation frees the KV on both workers whatever the moment: Generate streams with a
remote prefill are cancelled at random points (reserving, prefilling, writing the KV, admitting,
decoding), then both workers audit their blocks: nothing used, every invariant intact.

Real processes (a prefill and a decode worker of a tiny random Llama), NIXL on loopback."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local_cluster import Child
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from tests.integration.worker_pair import prefill_decode_pair

pytestmark = pytest.mark.slow

NUM_BLOCKS = 128
ROUNDS = 12
PER_ROUND = 12


@pytest.fixture(scope="module")
def workers(tiny_chat_model_dir: Path) -> Iterator[dict[str, Child]]:
    with prefill_decode_pair(tiny_chat_model_dir, NUM_BLOCKS, 16) as children:
        yield children


async def cancelled_streams(decode: str, prefill: str) -> tuple[int, int]:
    """(streams that finished before their cancel, streams cancelled)."""
    rng = random.Random(5)
    finished = cancelled = 0
    async with grpc.aio.insecure_channel(decode) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)

        async def one(i: int) -> None:
            nonlocal finished, cancelled
            request = pb.GenerateRequest(
                request_id=f"c{i}",
                prompt_token_ids=[rng.randrange(100, 40000) for _ in range(rng.randrange(5, 90))],
                sampling=pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
            )
            request.prefill.remote.prefill_worker_id = "prefill-0"
            request.prefill.remote.prefill_address = prefill
            call = stub.Generate(request)

            async def drain() -> None:
                async for _ in call:
                    pass

            try:
                await asyncio.wait_for(drain(), rng.uniform(0.0, 0.12))
                finished += 1
            except TimeoutError:
                cancelled += 1

        for r in range(ROUNDS):
            await asyncio.gather(*(one(r * PER_ROUND + i) for i in range(PER_ROUND)))
    return finished, cancelled


def audit(address: str, role: str) -> pb.WorkerLoad:
    async def call() -> pb.WorkerLoad:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = (
                pb_grpc.DecodeWorkerStub(channel)
                if role == "decode"
                else pb_grpc.PrefillWorkerStub(channel)
            )
            load: pb.WorkerLoad = await stub.Load(pb.LoadRequest(audit_blocks=True), timeout=10)
            return load

    return asyncio.run(call())


def test_cancelled_remote_prefills_leave_no_block_behind(workers: dict[str, Child]) -> None:
    decode, prefill = workers["decode"].address, workers["prefill"].address
    finished, cancelled = asyncio.run(cancelled_streams(decode, prefill))
    assert cancelled > ROUNDS * PER_ROUND // 3  # the delays cut most streams short
    for role, address in (("decode", decode), ("prefill", prefill)):
        deadline = time.monotonic() + 40  # a fenced reservation waits for the source's ack
        load = audit(address, role)
        while load.block_audit.num_used and time.monotonic() < deadline:
            time.sleep(0.2)
            load = audit(address, role)
        a = load.block_audit
        assert a.error == "", a.error
        assert a.num_used == 0 and not a.holders, (role, finished, cancelled, a)
        assert a.num_free + a.num_cached == a.num_total == NUM_BLOCKS
        assert load.num_running == load.num_waiting == 0
