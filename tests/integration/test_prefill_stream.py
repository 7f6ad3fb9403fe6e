"""The Prefill call is client-streaming (request first, KV destination second, while the
prompt computes): every way it ends without a send frees the prefill worker's blocks, and the
decode worker's. Real processes, driven through their gRPC servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local_cluster import Child
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from tests.integration.worker_pair import prefill_decode_pair

BLOCK_SIZE = 16
# the decode worker takes prompts up to 128 tokens: a 200-token prompt's reservation fails
# there (after the Prefill call opened), while the prefill worker (512) computes it
DECODE_ARGS = ("--max-model-len", "128", "--num-blocks", "16")
SAMPLING = pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(tiny_chat_model_dir: Path) -> Iterator[dict[str, Child]]:
    with prefill_decode_pair(tiny_chat_model_dir, 64, BLOCK_SIZE, DECODE_ARGS) as children:
        yield children


def _opening(rid: str, prompt: list[int]) -> pb.PrefillMessage:
    return pb.PrefillMessage(
        request=pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING)
    )


async def _audit(address: str, role: str, settle_s: float = 20.0) -> pb.BlockAudit:
    """The worker's block audit once nothing is held (or settle_s passed)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DecodeWorkerStub if role == "decode" else pb_grpc.PrefillWorkerStub
        load = stub(channel).Load  # type: ignore[attr-defined]
        deadline = time.monotonic() + settle_s
        while True:
            audit: pb.BlockAudit = (await load(pb.LoadRequest(audit_blocks=True))).block_audit
            if not audit.num_used or time.monotonic() > deadline:
                return audit


async def _held(address: str, rid: str) -> None:
    """Waits until the prefill worker computed rid and holds its blocks for the send."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.PrefillWorkerStub(channel)
        for _ in range(400):
            load = await stub.Load(pb.LoadRequest(audit_blocks=True))
            if f"held:{rid}" in load.block_audit.holders:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{rid} was never held")


@pytest.mark.parametrize("when", ["computing", "computed"])
def test_a_call_cancelled_before_its_destination_frees_the_prefill(
    workers: dict[str, Child], when: str
) -> None:
    """The decode side's reservation failed (it cancels the call) while the prompt was still
    computing, or after it was computed and held for the send."""
    prefill = workers["prefill"].address

    async def run() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(prefill) as channel:
            call = pb_grpc.PrefillWorkerStub(channel).Prefill(timeout=30)
            await call.write(_opening(f"cancel-{when}", list(range(500, 700))))
            if when == "computed":
                await _held(prefill, f"cancel-{when}")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            return await call.code()

    assert asyncio.run(run()) == grpc.StatusCode.CANCELLED
    audit = asyncio.run(_audit(prefill, "prefill"))
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit


@pytest.mark.parametrize("second", ["none", "request", "no_kv"])
def test_a_call_without_a_destination_is_invalid_and_frees(
    workers: dict[str, Child], second: str
) -> None:
    """The stream ends (or goes on) without a usable KV destination: INVALID_ARGUMENT, with
    the reason, once the prompt is computed and held; the held blocks are freed."""
    prefill = workers["prefill"].address
    rid = f"nodest-{second}"

    async def run() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(prefill) as channel:
            call = pb_grpc.PrefillWorkerStub(channel).Prefill(timeout=30)
            await call.write(_opening(rid, list(range(800, 900))))
            await _held(prefill, rid)
            if second == "request":
                await call.write(_opening(rid, [1, 2, 3]))
            elif second == "no_kv":
                await call.write(pb.PrefillMessage(destination=pb.KVDestination()))
            await call.done_writing()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            return e.value

    error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert ("KV handle" if second == "no_kv" else "KV destination") in (error.details() or "")
    audit = asyncio.run(_audit(prefill, "prefill"))
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit


def test_a_failed_reservation_ends_the_started_prefill(workers: dict[str, Child]) -> None:
    """The Prefill call opens before the decode worker reserves: a prompt its pool cannot hold
    is refused there, the call is cancelled, and neither worker keeps a block; the same
    pair then serves a remote prefill that fits."""
    decode, prefill = workers["decode"].address, workers["prefill"].address

    def request(rid: str, prompt: list[int]) -> pb.GenerateRequest:
        req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING)
        req.prefill.remote.prefill_worker_id = "prefill-0"
        req.prefill.remote.prefill_address = prefill
        return req

    async def generate(req: pb.GenerateRequest) -> list[int]:
        async with grpc.aio.insecure_channel(decode) as channel:
            return [
                t async for msg in pb_grpc.DecodeWorkerStub(channel).Generate(req)
                for t in msg.token_ids
            ]  # fmt: skip

    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(generate(request("too-big", list(range(1000, 1200)))))
    assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    for address, role in ((decode, "decode"), (prefill, "prefill")):
        audit = asyncio.run(_audit(address, role))
        assert audit.error == "" and audit.num_used == 0 and not audit.holders, (role, audit)
    assert len(asyncio.run(generate(request("fits", list(range(1000, 1060)))))) == 4


def test_a_call_that_ends_before_its_destination_falls_back(workers: dict[str, Child]) -> None:
    """The peer ends the call before the destination is written (here a server without the
    Prefill method: UNIMPLEMENTED at once; a prefill worker that died mid-compute alike): the
    decode worker prefills the prompt itself, same tokens, and keeps no reserved block."""
    decode = workers["decode"].address
    prompt = list(range(2000, 2060))

    async def generate(rid: str, prefill_address: str | None) -> list[int]:
        req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING)
        if prefill_address is None:
            req.prefill.local.SetInParent()
        else:
            req.prefill.remote.prefill_worker_id = "not-a-prefill-worker"
            req.prefill.remote.prefill_address = prefill_address
        async with grpc.aio.insecure_channel(decode) as channel:
            return [
                t async for msg in pb_grpc.DecodeWorkerStub(channel).Generate(req)
                for t in msg.token_ids
            ]  # fmt: skip

    assert asyncio.run(generate("ended-early", decode)) == asyncio.run(generate("local", None))
    audit = asyncio.run(_audit(decode, "decode"))
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit
