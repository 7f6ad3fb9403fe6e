"""One prefill and one decode worker as real processes (deploy/local_cluster.py), for the tests
that drive the disagg path through their gRPC servers directly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from deploy.local_cluster import Child, spawn, stop_children, wait_ready
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pb_grpc


@contextlib.contextmanager
def prefill_decode_pair(
    model_dir: Path, num_blocks: int, block_size: int, decode_args: Sequence[str] = ()
) -> Iterator[dict[str, Child]]:
    """{"prefill": prefill-0, "decode": decode-0}, both ready; stopped (by PID) on exit.
    decode_args go last on the decode worker's command line (the last of an option wins)."""
    args = ["--model", str(model_dir), "--port", "0", "--num-blocks", str(num_blocks),
            "--max-model-len", "512", "--block-size", str(block_size)]  # fmt: skip
    children = {
        "prefill": spawn("prefill-0", "prefill_worker", [*args, "--worker-id", "prefill-0"]),
        "decode": spawn(
            "decode-0", "decode_worker", [*args, "--worker-id", "decode-0", *decode_args]
        ),
    }
    try:
        for child in children.values():
            wait_ready(child, 180)
        yield children
    finally:
        stop_children(list(children.values()))


def generate_request(
    rid: str, prompt: list[int], sampling: pb.SamplingParams, prefill_address: str | None
) -> pb.GenerateRequest:
    """A Generate request whose prompt prefill-0 at prefill_address computes (None: the
    decode worker itself)."""
    req = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
    if prefill_address is None:
        req.prefill.local.SetInParent()
    else:
        req.prefill.remote.prefill_worker_id = "prefill-0"
        req.prefill.remote.prefill_address = prefill_address
    return req


def _stub(channel: grpc.aio.Channel, role: str) -> Any:
    """The worker's own stub: Health and Load are served by both roles."""
    return (pb_grpc.DecodeWorkerStub if role == "decode" else pb_grpc.PrefillWorkerStub)(channel)


def worker_samples(address: str, role: str) -> list[Sample]:
    """Every sample of the worker's Prometheus /metrics (found through its Health reply)."""

    async def health() -> pb.HealthResponse:
        async with grpc.aio.insecure_channel(address) as channel:
            reply: pb.HealthResponse = await _stub(channel, role).Health(pb.HealthRequest())
            return reply

    text = httpx.get(f"http://{asyncio.run(health()).metrics_address}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def settled_audit(address: str, role: str, settle_s: float = 20.0) -> pb.BlockAudit:
    """The worker's block audit once it holds no block, or after settle_s (a released
    reservation waits for its transfer's fence; a held prefill for its send's end)."""

    async def audit() -> pb.BlockAudit:
        async with grpc.aio.insecure_channel(address) as channel:
            load = await _stub(channel, role).Load(pb.LoadRequest(audit_blocks=True), timeout=10)
            return load.block_audit  # type: ignore[no-any-return]

    deadline = time.monotonic() + settle_s
    result = asyncio.run(audit())
    while result.num_used and time.monotonic() < deadline:
        time.sleep(0.1)
        result = asyncio.run(audit())
    return result
