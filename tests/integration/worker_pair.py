"""One prefill and one decode worker as real processes (deploy/local_cluster.py), for the tests
that drive the disagg path through their gRPC servers directly."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.local_cluster import Child, spawn, stop_children, wait_ready
from proto import tandem_pb2 as pb


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
