"""A real decode worker process, driven over gRPC: greedy output equals the offline engine,
abort frees blocks, bad requests get INVALID_ARGUMENT, KV events start with a snapshot."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local_cluster import Child, spawn, stop_children, wait_ready
from engine import LLM, SamplingParams
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc

NUM_BLOCKS = 256


@pytest.fixture(scope="module")
def worker(tiny_chat_model_dir: Path) -> Iterator[Child]:
    child = spawn(
        "decode-0",
        "decode_worker",
        ["--model", str(tiny_chat_model_dir), "--port", "0", "--worker-id", "decode-0",
         "--num-blocks", str(NUM_BLOCKS), "--max-model-len", "512"],
    )  # fmt: skip
    try:
        wait_ready(child, 120)
        yield child
    finally:
        stop_children([child])


def _request(rid: str, prompt: list[int], **sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=pb.SamplingParams(**sampling),  # type: ignore[arg-type]
        prefill=pb.PrefillPlan(local=pb.LocalPrefill()),
    )


async def _generate(address: str, requests: list[pb.GenerateRequest]) -> list[list[int]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.DecodeWorkerStub(channel)

        async def one(req: pb.GenerateRequest) -> list[int]:
            tokens: list[int] = []
            async for msg in stub.Generate(req):
                tokens.extend(msg.token_ids)
                if msg.finished:
                    resumed = len(req.resume_output_token_ids)
                    assert msg.usage.completion_tokens == resumed + len(tokens)
                    assert msg.usage.prompt_tokens == len(req.prompt_token_ids)
            return tokens

        return list(await asyncio.gather(*(one(r) for r in requests)))


def test_greedy_matches_offline_engine(worker: Child, tiny_chat_model_dir: Path) -> None:
    prompts = [[(7 * i + j) % 40000 + 100 for j in range(n)] for i, n in enumerate((3, 40, 77))]
    reqs = [
        _request(f"g{i}", p, max_tokens=20, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    got = asyncio.run(_generate(worker.address, reqs))
    llm = LLM(str(tiny_chat_model_dir), num_blocks=NUM_BLOCKS, max_model_len=512)
    want = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert got == [r.outputs[0].token_ids for r in want]


def test_output_interval_groups_tokens_into_fewer_messages(worker: Child) -> None:
    """The first token alone, then one message per `output_interval` tokens, the finished one
    with the rest; tokens, text and usage are the same as one message per step."""

    async def messages(interval: int) -> list[pb.GenerateResponse]:
        req = _request(f"iv{interval}", [5, 6, 7, 8], max_tokens=20, temperature=0.0,
                       ignore_eos=True, logprobs=1)  # fmt: skip
        req.output_interval = interval
        async with grpc.aio.insecure_channel(worker.address) as channel:
            return [m async for m in pb_grpc.DecodeWorkerStub(channel).Generate(req)]

    step, grouped = asyncio.run(messages(0)), asyncio.run(messages(8))
    assert [len(m.token_ids) for m in step] == [1] * 20
    assert [len(m.token_ids) for m in grouped] == [1, 8, 8, 3]
    assert [t for m in grouped for t in m.token_ids] == [t for m in step for t in m.token_ids]
    assert "".join(m.text for m in grouped) == "".join(m.text for m in step)
    assert [lp.token_id for m in grouped for lp in m.logprobs] == [
        t for m in step for t in m.token_ids
    ]
    assert grouped[-1].finished and not any(m.finished for m in grouped[:-1])
    assert grouped[-1].usage.completion_tokens == 20


def test_cancelled_stream_frees_blocks(worker: Child) -> None:
    async def run() -> pb.WorkerLoad:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.DecodeWorkerStub(channel)
            call = stub.Generate(
                _request("c1", list(range(100, 300)), max_tokens=400, ignore_eos=True)
            )
            await call.read()
            await call.read()
            call.cancel()
            for _ in range(100):  # the abort reaches the engine within a few steps
                load = await stub.Load(pb.LoadRequest())
                if load.num_running == 0 and load.num_blocks_free == NUM_BLOCKS:
                    return load
                await asyncio.sleep(0.05)
            return load

    load = asyncio.run(run())
    assert load.num_running == 0
    assert load.num_blocks_free == NUM_BLOCKS


@pytest.mark.parametrize(
    ("prompt", "sampling", "needle"),
    [
        ([5, 6], {"temperature": -1.0}, "temperature"),
        ([5, 6], {"top_p": 0.0}, "top_p"),
        ([], {}, "empty"),
        ([10**6], {}, "token ids"),
        ([5] * 600, {}, "context"),
    ],
)
def test_bad_requests_are_invalid_argument(
    worker: Child, prompt: list[int], sampling: dict, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate(worker.address, [_request("bad", prompt, **sampling)]))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")


def test_health_load_and_kv_events(worker: Child) -> None:
    async def run() -> tuple[pb.HealthResponse, pb.KVEvent]:
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = pb_grpc.DecodeWorkerStub(channel)
            health = await stub.Health(pb.HealthRequest())
            await _generate(worker.address, [_request("kv", list(range(200, 240)), max_tokens=2)])
            events = stub.KVEvents(pb.KVEventsRequest())
            first = await events.read()
            events.cancel()
            return health, first

    health, first = asyncio.run(run())
    assert health.ready and health.role == "decode" and health.worker_id == "decode-0"
    assert first.cleared
    assert len(first.stored_block_hashes) >= 2  # 40 prompt tokens = 2 full blocks of 16


async def _audit(address: str) -> pb.BlockAudit:
    async with grpc.aio.insecure_channel(address) as channel:
        load = await pb_grpc.DecodeWorkerStub(channel).Load(pb.LoadRequest(audit_blocks=True))
    assert load.num_blocks_free + load.num_blocks_used == load.num_blocks_total
    return load.block_audit


def test_a_resumed_request_continues_where_it_stopped(worker: Child) -> None:
    """Migration's worker half: resume_output_token_ids continues the greedy stream exactly and
    usage counts the whole output; the block audit balances afterwards."""
    prompt = list(range(300, 333))
    sampling = {"max_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    (full,) = asyncio.run(_generate(worker.address, [_request("r-full", prompt, **sampling)]))
    resumed = _request("r-rest", prompt, **sampling)
    resumed.resume_output_token_ids.extend(full[:5])
    (rest,) = asyncio.run(_generate(worker.address, [resumed]))
    assert rest == full[5:]
    remote = _request("r-remote", prompt, **sampling)
    remote.prefill.remote.prefill_address = "127.0.0.1:1"
    remote.resume_output_token_ids.append(full[0])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_generate(worker.address, [remote]))
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    audit = asyncio.run(_audit(worker.address))
    assert audit.error == "" and audit.num_used == 0
    assert audit.num_free + audit.num_cached + audit.num_used == audit.num_total == NUM_BLOCKS


def test_a_failed_remote_prefill_is_computed_here(worker: Child) -> None:
    """The prefill worker is unreachable (a dead one's address): the decode worker releases its
    reservation behind the fence and prefills the prompt itself; the output is unchanged."""
    prompt = list(range(400, 450))
    sampling = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    (local,) = asyncio.run(_generate(worker.address, [_request("f-local", prompt, **sampling)]))
    remote = _request("f-remote", prompt, **sampling)
    remote.prefill.remote.prefill_worker_id = "prefill-gone"
    remote.prefill.remote.prefill_address = "127.0.0.1:1"  # nothing listens there
    (got,) = asyncio.run(_generate(worker.address, [remote]))
    assert got == local
    audit = asyncio.run(_audit(worker.address))
    for _ in range(50):  # the reservation is released once the fence says so
        if audit.num_used == 0:
            break
        time.sleep(0.05)
        audit = asyncio.run(_audit(worker.address))
    assert audit.error == "" and audit.num_used == 0
