"""Decode-side prefix reuse in disagg, on real processes (gRPC, the KV backend, Prometheus):
a second turn's reservation takes the blocks the decode worker already holds from the first
turn, and the prefill worker writes only the rest (docs/design.md, "Decode-side prefix
reuse"). Greedy output equals the offline engine without prefix caching and the collocated
path; a reservation with hits that falls back to a local prefill leaks no block."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local_cluster import Child
from engine import LLM, SamplingParams
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc
from tests.integration.worker_pair import (
    generate_request,
    prefill_decode_pair,
    settled_audit,
    worker_samples,
)

NUM_BLOCKS = 128
BLOCK_SIZE = 16
# tiny_chat_model_dir: 2 layers x (k, v) x 2 kv heads x head_dim 16 x 4 bytes per token
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * BLOCK_SIZE
TURN1 = list(range(1000, 1040))  # 40 tokens: 3 blocks, 2 full
ANSWER_TOKENS = 9  # the decode worker then holds 40 + 9 tokens, 48 computed: 3 full blocks
NEW_MESSAGE = list(range(3000, 3030))
_SERIES = ("tandem_worker_kv_transfer_bytes_total", "tandem_worker_kv_reused_blocks_total")
SAMPLING = {"max_tokens": ANSWER_TOKENS, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def workers(tiny_chat_model_dir: Path) -> Iterator[dict[str, Child]]:
    with prefill_decode_pair(tiny_chat_model_dir, NUM_BLOCKS, BLOCK_SIZE) as children:
        yield children


def _request(rid: str, prompt: list[int], prefill_address: str | None) -> pb.GenerateRequest:
    return generate_request(rid, prompt, pb.SamplingParams(**SAMPLING), prefill_address)


def _generate(address: str, req: pb.GenerateRequest) -> tuple[list[int], pb.Usage]:
    async def run() -> tuple[list[int], pb.Usage]:
        tokens: list[int] = []
        usage = pb.Usage()
        async with grpc.aio.insecure_channel(address) as channel:
            async for msg in pb_grpc.DecodeWorkerStub(channel).Generate(req):
                tokens.extend(msg.token_ids)
                if msg.finished:
                    usage = msg.usage
        return tokens, usage

    return asyncio.run(run())


def _metrics(address: str, role: str) -> dict[str, float]:
    return {s.name: s.value for s in worker_samples(address, role) if s.name in _SERIES}


def test_second_turn_transfers_only_uncached_blocks(
    workers: dict[str, Child], tiny_chat_model_dir: Path
) -> None:
    decode, prefill = workers["decode"].address, workers["prefill"].address
    bytes_key, reused_key = _SERIES

    answer, usage1 = _generate(decode, _request("turn1", TURN1, prefill))
    m1, p1 = _metrics(decode, "decode"), _metrics(prefill, "prefill")
    assert m1[bytes_key] == p1[bytes_key] == 3 * BLOCK_BYTES  # nothing cached anywhere yet
    assert m1[reused_key] == 0 and usage1.cached_tokens == 0

    turn2 = TURN1 + answer + NEW_MESSAGE  # 79 tokens: 5 blocks
    got, usage2 = _generate(decode, _request("turn2", turn2, prefill))
    m2, p2 = _metrics(decode, "decode"), _metrics(prefill, "prefill")
    # the decode worker holds turn 1's 3 full blocks: only blocks 3 and 4 travel
    assert m2[reused_key] - m1[reused_key] == 3
    assert m2[bytes_key] - m1[bytes_key] == 2 * BLOCK_BYTES
    assert p2[bytes_key] - p1[bytes_key] == 2 * BLOCK_BYTES
    # the longer of the two hits: decode 48 tokens (the prefill worker had 32)
    assert usage2.cached_tokens == 3 * BLOCK_SIZE
    assert usage2.prompt_tokens == len(turn2)

    llm = LLM(str(tiny_chat_model_dir), num_blocks=NUM_BLOCKS, max_model_len=512,
              block_size=BLOCK_SIZE, enable_prefix_caching=False)  # fmt: skip
    (want,) = llm.generate([turn2], SamplingParams(**SAMPLING))  # type: ignore[arg-type]
    assert got == want.outputs[0].token_ids
    collocated, _ = _generate(decode, _request("turn2-local", turn2, None))
    assert got == collocated

    audit = settled_audit(decode, "decode")
    assert audit.error == "" and audit.num_used == 0, audit


def test_a_failed_remote_prefill_with_hits_leaks_no_block(workers: dict[str, Child]) -> None:
    """The reservation takes prefix hits, the prefill worker is unreachable: the reservation
    (hits and new blocks) is released behind the fence and the prompt computed here."""
    decode, prefill = workers["decode"].address, workers["prefill"].address
    prompt = list(range(5000, 5040))
    answer, _ = _generate(decode, _request("f1", prompt, prefill))
    turn2 = prompt + answer + NEW_MESSAGE
    before = _metrics(decode, "decode")
    got, usage = _generate(decode, _request("f2", turn2, "127.0.0.1:1"))  # nothing listens
    after = _metrics(decode, "decode")
    assert after == before  # nothing landed, nothing counted as reused
    assert usage.cached_tokens == 3 * BLOCK_SIZE  # the local prefill hits the same blocks
    collocated, _ = _generate(decode, _request("f2-local", turn2, None))
    assert got == collocated
    audit = settled_audit(decode, "decode")
    assert audit.error == "" and audit.num_used == 0, audit
    assert audit.num_free + audit.num_cached == audit.num_total == NUM_BLOCKS
