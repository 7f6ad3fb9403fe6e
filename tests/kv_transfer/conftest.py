"""A sink process and a source process per backend, shared by the module's tests (starting a
process costs seconds on 2 cores); a test that kills one respawns it."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kv_transfer.peer import Peer

# 4 layers x 2 (k|v) x 16 tokens x 2 heads x 64 dims x 4 B = 64 KiB blocks, a 16 MiB pool
LAYOUT: dict[str, Any] = {
    "model": "tiny-llama",
    "dtype": "float32",
    "num_blocks": 256,
    "block_size": 16,
    "num_layers": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
}
BACKENDS = ["nixl", "ucx"]


class Pair:
    """The sink (decode side) and source (prefill side) processes of one backend."""

    def __init__(self, backend: str, **source_options: Any) -> None:
        """source_options: for the source's child (peer._make), e.g. nixl_parts."""
        self.backend = backend
        self.one_sided = backend == "nixl"  # fencing waits for the source's ack
        self._source_options = source_options
        self.sink = Peer("sink", backend, LAYOUT)
        self.source = Peer("source", backend, LAYOUT, **source_options)
        self.sink.ready()
        self.source.ready()
        self._ids = itertools.count()
        self._planned: list[int] = []

    def respawn(self, role: str) -> None:
        old = getattr(self, role)
        old.stop()
        options = self._source_options if role == "source" else {}
        setattr(self, role, Peer(role, self.backend, LAYOUT, **options).ready())

    def plan(
        self, sizes: list[int], *, scatter: bool = True, lease_s: float = 30.0
    ) -> list[dict[str, Any]]:
        """Reserve destination blocks (sink.expect) and fill source blocks, one transfer per
        size; returns [{tid, handle, dst, src}] ready for source.call("send", sends=...)."""
        total = sum(sizes)
        dst_all = self.sink.call("pick", n=total, scatter=scatter, avoid=[])["block_ids"]
        src_all = self.source.call("pick", n=total, scatter=scatter, avoid=self._planned)[
            "block_ids"
        ]
        self._planned += src_all  # not taken by the source until send()
        out = []
        at = 0
        for n in sizes:
            i = next(self._ids)
            tid = f"req-{i}"
            dst, src = dst_all[at : at + n], src_all[at : at + n]
            at += n
            self.source.call("fill", block_ids=src, seed=i)
            handle = self.sink.call("expect", tid=tid, block_ids=dst, lease_s=lease_s)["handle"]
            out.append({"tid": tid, "handle": handle, "dst": dst, "src": src})
        return out

    def send(self, plan: list[dict[str, Any]]) -> None:
        sent = {b for p in plan for b in p["src"]}
        self._planned = [b for b in self._planned if b not in sent]
        self.source.call("send", sends=[{"handle": p["handle"], "src": p["src"]} for p in plan])

    def same_bytes(self, p: dict[str, Any]) -> bool:
        return bool(
            self.sink.call("digest", block_ids=p["dst"])["digests"]
            == self.source.call("digest", block_ids=p["src"])["digests"]
        )

    def audit(self) -> None:
        """Both sides: no exactly-once violation, nothing left open; admitted blocks freed."""
        for peer in (self.sink, self.source):
            account = peer.call("account")
            assert account["errors"] == [], account
            assert account["open"] == [], account
            for tid in account["admitted"]:
                peer.call("finish", tid=tid)
        assert self.sink.call("account")["num_open"] == 0
        assert self.sink.call("account")["free"] == LAYOUT["num_blocks"]
        assert self.source.call("account")["free"] == LAYOUT["num_blocks"]

    def close(self) -> None:
        self.sink.stop()
        self.source.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = Pair(request.param)
    try:
        yield p
    finally:
        p.close()
