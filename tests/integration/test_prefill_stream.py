"""Remote prefills go over one long-lived PrefillSession stream per (decode, prefill) pair:
per request, its request first, its KV destination later (while the prompt computes), or a
cancel; down, its first token as soon as it is sampled, then its reply or error. Every way a
request ends without a send frees the prefill worker's blocks, and the decode worker's; a
per-request error leaves the session usable; a broken session falls back to local prefills.
Real processes, driven through their gRPC servers (and one scripted prefill peer)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.local_cluster import Child, spawn, stop_children, wait_ready
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from tests.integration.worker_pair import (
    generate_request,
    prefill_decode_pair,
    settled_audit,
    worker_samples,
)

BLOCK_SIZE = 16
# the decode worker takes prompts up to 128 tokens: a 200-token prompt's reservation fails
# there (after the request was sent), while the prefill worker (512) computes it
# and a remote prefill that gets no reply within 5 s is cancelled (the lease test below)
DECODE_ARGS = ("--max-model-len", "128", "--num-blocks", "16", "--kv-lease-s", "5")
SAMPLING = pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workers(tiny_chat_model_dir: Path) -> Iterator[dict[str, Child]]:
    with prefill_decode_pair(tiny_chat_model_dir, 64, BLOCK_SIZE, DECODE_ARGS) as children:
        yield children


def _request(rid: str, prompt: list[int]) -> pb.PrefillUp:
    return pb.PrefillUp(
        request=pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=SAMPLING)
    )


def _destination(rid: str, kv: pb.KVHandle | None = None) -> pb.PrefillUp:
    destination = pb.PrefillDestination(request_id=rid, destination=pb.KVDestination(kv=kv))
    return pb.PrefillUp(destination=destination)


def _cancel(rid: str) -> pb.PrefillUp:
    return pb.PrefillUp(cancel=pb.PrefillCancel(request_id=rid))


def _generate_request(rid: str, prompt: list[int], prefill: str | None) -> pb.GenerateRequest:
    return generate_request(rid, prompt, SAMPLING, prefill)


async def _generate(decode: str, req: pb.GenerateRequest) -> list[int]:
    async with grpc.aio.insecure_channel(decode) as channel:
        return [
            t async for msg in pb_grpc.DecodeWorkerStub(channel).Generate(req)
            for t in msg.token_ids
        ]  # fmt: skip


def _counter(address: str, role: str, name: str, **labels: str) -> float:
    """The sum of a worker's counter `name` over the series with these labels."""
    return sum(
        s.value
        for s in worker_samples(address, role)
        if s.name == name and labels.items() <= s.labels.items()
    )


FALLBACKS = "tandem_worker_remote_prefill_fallbacks_total"


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
def test_a_request_cancelled_before_its_destination_frees_the_prefill(
    workers: dict[str, Child], when: str
) -> None:
    """The decode side's reservation failed (it sends a cancel) while the prompt was still
    computing, or after it was computed and held for the send: the request is answered
    CANCELLED, and the session goes on (a destination for it now is an unknown id's error)."""
    prefill = workers["prefill"].address
    rid = f"cancel-{when}"

    async def run() -> list[pb.PrefillError]:
        async with grpc.aio.insecure_channel(prefill) as channel:
            call = pb_grpc.PrefillWorkerStub(channel).PrefillSession(timeout=30)
            await call.write(_request(rid, list(range(500, 700))))
            if when == "computed":
                await _held(prefill, rid)
                sampled = await call.read()  # its first token, sent once computed
                assert sampled.WhichOneof("part") == "first" and sampled.first.request_id == rid
            await call.write(_cancel(rid))
            first = await call.read()
            if first.WhichOneof("part") == "first":  # computed before the cancel came
                assert when == "computing" and first.first.request_id == rid
                first = await call.read()
            await call.write(_destination(rid))
            second = await call.read()
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            return [first.error, second.error]

    cancelled, unknown = asyncio.run(run())
    assert (cancelled.request_id, cancelled.code) == (rid, "CANCELLED"), cancelled
    assert (unknown.request_id, unknown.code) == (rid, "FAILED_PRECONDITION"), unknown
    audit = settled_audit(prefill, "prefill")
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit


@pytest.mark.parametrize("ending", ["session_end", "no_kv"])
def test_a_request_without_a_destination_frees(workers: dict[str, Child], ending: str) -> None:
    """The session ends while a computed request waits for its destination (the request is
    cancelled with it), or the destination is unusable (INVALID_ARGUMENT for that request, with
    the reason; the session goes on): the held blocks are freed either way."""
    prefill = workers["prefill"].address
    rid = f"nodest-{ending}"

    async def run() -> list[pb.PrefillDown]:
        async with grpc.aio.insecure_channel(prefill) as channel:
            call = pb_grpc.PrefillWorkerStub(channel).PrefillSession(timeout=30)
            await call.write(_request(rid, list(range(800, 900))))
            await _held(prefill, rid)
            sampled = await call.read()  # its first token, sent once computed
            assert sampled.WhichOneof("part") == "first" and sampled.first.request_id == rid
            if ending == "no_kv":
                await call.write(_destination(rid))
                down = await call.read()
                assert down != grpc.aio.EOF
                return [down]
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            return []

    downs = asyncio.run(run())
    if ending == "no_kv":
        (error,) = (d.error for d in downs)
        assert (error.request_id, error.code) == (rid, "INVALID_ARGUMENT"), error
        assert "KV handle" in error.message
    audit = settled_audit(prefill, "prefill")
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit


def test_a_failed_reservation_ends_the_started_prefill(workers: dict[str, Child]) -> None:
    """The request is sent before the decode worker reserves: a prompt its pool cannot hold
    is refused there, the request is cancelled, and neither worker keeps a block; the same
    pair then serves a remote prefill that fits."""
    decode, prefill = workers["decode"].address, workers["prefill"].address

    def request(rid: str, prompt: list[int]) -> pb.GenerateRequest:
        return _generate_request(rid, prompt, prefill)

    async def generate(req: pb.GenerateRequest) -> list[int]:
        return await _generate(decode, req)

    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(generate(request("too-big", list(range(1000, 1200)))))
    assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    for address, role in ((decode, "decode"), (prefill, "prefill")):
        audit = settled_audit(address, role)
        assert audit.error == "" and audit.num_used == 0 and not audit.holders, (role, audit)
    assert len(asyncio.run(generate(request("fits", list(range(1000, 1060)))))) == 4


def test_a_session_that_ends_before_its_destination_falls_back(
    workers: dict[str, Child],
) -> None:
    """The peer ends the session before the destination is written (here a server without the
    PrefillSession method: UNIMPLEMENTED at once; a prefill worker that died mid-compute
    alike): the decode worker prefills the prompt itself, same tokens, and keeps no reserved
    block."""
    decode = workers["decode"].address
    prompt = list(range(2000, 2060))
    req = _generate_request("ended-early", prompt, decode)
    req.prefill.remote.prefill_worker_id = "not-a-prefill-worker"
    local = _generate_request("local", prompt, None)
    assert asyncio.run(_generate(decode, req)) == asyncio.run(_generate(decode, local))
    audit = settled_audit(decode, "decode")
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit


class _ScriptedPrefill(pb_grpc.PrefillWorkerServicer):
    """A prefill peer that answers each request's destination with `token` as its first token
    and then, once `fail` is set, an UNAVAILABLE error instead of a reply (a KV send that
    failed after the first token went out). Records the cancels it reads."""

    def __init__(self, token: int) -> None:
        self.token = token
        self.fail = asyncio.Event()
        self.cancels: list[str] = []

    async def PrefillSession(
        self, up: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PrefillDown]:
        async for msg in up:
            part = msg.WhichOneof("part")
            if part == "destination":
                rid = msg.destination.request_id
                yield pb.PrefillDown(
                    first=pb.PrefillFirstToken(request_id=rid, token_id=self.token)
                )
                await self.fail.wait()
                error = pb.PrefillError(request_id=rid, code="UNAVAILABLE", message="send failed")
                yield pb.PrefillDown(error=error)
            elif part == "cancel":
                self.cancels.append(msg.cancel.request_id)


@pytest.mark.parametrize("max_tokens", [1, 4])
def test_the_first_token_streams_before_the_kv_lands(
    workers: dict[str, Child], max_tokens: int
) -> None:
    """The decode worker streams the prefill side's first token as soon as it comes, while the
    KV is still on its way (here it never lands: the peer fails the request after it). The
    rest is computed here from prompt + first token: the same tokens as a local prefill,
    none twice, counted as a fallback. A first token that finishes the request (max_tokens
    1) ends it at once: the pending remote prefill is cancelled, nothing falls back. No
    block is kept either way."""
    decode = workers["decode"].address
    prompt = list(range(6000, 6050))
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    local = asyncio.run(_generate(decode, generate_request("early-local", prompt, sampling, None)))
    fallbacks = _counter(decode, "decode", FALLBACKS)

    async def run() -> tuple[list[list[int]], list[str]]:
        peer = _ScriptedPrefill(local[0])
        server = grpc.aio.server()
        pb_grpc.add_PrefillWorkerServicer_to_server(peer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            req = generate_request(f"early-{max_tokens}", prompt, sampling, f"127.0.0.1:{port}")
            messages: list[list[int]] = []
            async with grpc.aio.insecure_channel(decode) as channel:
                stream = pb_grpc.DecodeWorkerStub(channel).Generate(req, timeout=30)
                first = await stream.read()
                assert not peer.fail.is_set()  # no reply yet: the KV has not landed
                messages.append(list(first.token_ids))
                assert first.prefill_s > 0 and first.kv_transfer_s == 0
                peer.fail.set()
                while (msg := await stream.read()) != grpc.aio.EOF:
                    messages.append(list(msg.token_ids))
                    assert msg.kv_transfer_s == 0  # no KV ever landed
            for _ in range(100):  # the cancel may still be on its way
                if max_tokens > 1 or peer.cancels:
                    break
                await asyncio.sleep(0.05)
            return messages, peer.cancels
        finally:
            await server.stop(None)

    messages, cancels = asyncio.run(run())
    assert messages[0] == local[:1]
    assert [t for m in messages for t in m] == local
    expected_fallbacks = fallbacks + (1 if max_tokens > 1 else 0)
    assert _counter(decode, "decode", FALLBACKS) == expected_fallbacks
    if max_tokens == 1:
        assert cancels == ["early-1"]
    audit = settled_audit(decode, "decode")
    assert audit.error == "" and audit.num_used == 0 and not audit.holders, audit


def test_concurrent_requests_share_one_session(workers: dict[str, Child]) -> None:
    """Two remote prefills at once on the decode worker's one session with the prefill worker:
    both served remotely (no fallback), same tokens as local prefills, no block kept."""
    decode, prefill = workers["decode"].address, workers["prefill"].address
    prompts = [list(range(3000, 3050)), list(range(3100, 3170))]
    fallbacks = _counter(decode, "decode", FALLBACKS)

    async def both() -> list[list[int]]:
        reqs = [_generate_request(f"both-{i}", p, prefill) for i, p in enumerate(prompts)]
        return list(await asyncio.gather(*(_generate(decode, r) for r in reqs)))

    remote = asyncio.run(both())
    local = [asyncio.run(_generate(decode, _generate_request(f"loc-{i}", p, None)))
             for i, p in enumerate(prompts)]  # fmt: skip
    assert remote == local
    assert _counter(decode, "decode", FALLBACKS) == fallbacks
    for address, role in ((decode, "decode"), (prefill, "prefill")):
        audit = settled_audit(address, role)
        assert audit.error == "" and audit.num_used == 0 and not audit.holders, (role, audit)


def test_a_request_past_its_lease_is_cancelled_and_the_session_goes_on(
    workers: dict[str, Child],
) -> None:
    """The prefill worker stalls (stopped) with a request pending: past the lease (5 s) the
    decode worker gives up on it alone, sends its cancel and prefills locally. Resumed, the
    prefill worker reads request, destination and cancel, and frees; the session was not
    broken: the next request is served remotely on it."""
    decode, prefill = workers["decode"].address, workers["prefill"].address
    prompt = list(range(5000, 5060))
    local = asyncio.run(_generate(decode, _generate_request("lease-local", prompt, None)))
    # the session is open (its first write waits for the connection: a stopped peer would
    # break it)
    assert asyncio.run(_generate(decode, _generate_request("lease-warm", prompt, prefill))) == local
    fallbacks = _counter(decode, "decode", FALLBACKS)
    pgid = workers["prefill"].proc.pid
    os.killpg(pgid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        late = asyncio.run(_generate(decode, _generate_request("lease-late", prompt, prefill)))
        assert late == local and time.monotonic() - start >= 5.0
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert _counter(decode, "decode", FALLBACKS) == fallbacks + 1
    assert _counter(decode, "decode", FALLBACKS, reason="deadline_exceeded") >= 1
    again = asyncio.run(_generate(decode, _generate_request("lease-again", prompt, prefill)))
    assert again == local
    assert _counter(decode, "decode", FALLBACKS) == fallbacks + 1
    for address, role in ((decode, "decode"), (prefill, "prefill")):
        audit = settled_audit(address, role)
        assert audit.error == "" and audit.num_used == 0 and not audit.holders, (role, audit)


def test_a_restarted_prefill_worker_gets_a_new_session(
    workers: dict[str, Child], tiny_chat_model_dir: Path
) -> None:
    """The prefill worker dies with a request pending on the session (stopped, then killed):
    the stream breaks, the request falls back to a local prefill (same tokens, no block kept).
    Restarted at the same address, the next request opens a new session and is served
    remotely. Runs last: it replaces the module's prefill worker."""
    decode, prefill = workers["decode"].address, workers["prefill"].address
    prompt = list(range(4000, 4060))
    local = asyncio.run(_generate(decode, _generate_request("restart-local", prompt, None)))
    fallbacks = _counter(decode, "decode", FALLBACKS)
    old = workers["prefill"].proc
    os.killpg(old.pid, signal.SIGSTOP)  # our child's own group: the request stays pending

    async def pending_then_killed() -> list[int]:
        generate = asyncio.ensure_future(
            _generate(decode, _generate_request("restart-pending", prompt, prefill))
        )
        await asyncio.sleep(1.0)
        assert not generate.done()
        os.killpg(old.pid, signal.SIGKILL)
        return await asyncio.wait_for(generate, 30)

    try:
        assert asyncio.run(pending_then_killed()) == local
    finally:
        os.killpg(old.pid, signal.SIGKILL)  # no-op once dead; never left stopped
        old.wait()
    assert _counter(decode, "decode", FALLBACKS) == fallbacks + 1
    assert _counter(decode, "decode", FALLBACKS, reason="unavailable") >= 1
    stop_children([workers["prefill"]])
    port = prefill.rsplit(":", 1)[1]
    args = ["--model", str(tiny_chat_model_dir), "--port", port, "--num-blocks", "64",
            "--max-model-len", "512", "--block-size", str(BLOCK_SIZE),
            "--worker-id", "prefill-0"]  # fmt: skip
    workers["prefill"] = spawn("prefill-0", "prefill_worker", args)  # stopped by the fixture
    assert wait_ready(workers["prefill"], 180) == prefill
    again = asyncio.run(_generate(decode, _generate_request("restart-again", prompt, prefill)))
    assert again == local
    assert _counter(decode, "decode", FALLBACKS) == fallbacks + 1
    for address, role in ((decode, "decode"), (prefill, "prefill")):
        audit = settled_audit(address, role)
        assert audit.error == "" and audit.num_used == 0 and not audit.holders, (role, audit)
