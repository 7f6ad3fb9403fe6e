"""Two-process harness: a child process owns a real KVCache and a sink or a source, and obeys
commands from the test over a pipe (msgpack bytes). Its loop alternates commands with
`poll(2 ms)`, records events and keeps its own block accounting, which the test audits:
every reserved (sink) or sent (source) block ends exactly once, in a landing or a release.

GatedTransport wraps a backend's source transport so a test can hold a granted write "in
flight" for as long as it likes (deterministic abort / expiry / kill mid-transfer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack

CHILD_ENV = {"UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n", "NIXL_LOG_LEVEL": "WARN"}
Reply = dict[str, Any]


# ---- parent side -------------------------------------------------------------------------------
class Peer:
    """Handle on one child process (role "sink" or "source")."""

    def __init__(self, role: str, backend: str, layout: dict[str, Any], **options: Any) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.role, self.backend = role, backend
        self.process = ctx.Process(
            target=child_main, args=(child_conn, role, backend, layout, options), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.info: Reply = {}

    def ready(self) -> Peer:
        """Wait for the child to be up (imports, agent, pool); returns self."""
        self.info = self.call("hello", timeout_s=90)
        return self

    def call(self, op: str, timeout_s: float = 20.0, **args: Any) -> Reply:
        self._conn.send_bytes(msgpack.packb({"op": op, **args}, use_bin_type=True))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"{self.role} did not answer {op!r} in {timeout_s} s")
        reply: Reply = msgpack.unpackb(self._conn.recv_bytes(), raw=False)
        if "exception" in reply:
            raise RuntimeError(f"{self.role} failed on {op!r}: {reply['exception']}")
        return reply

    def wait_events(
        self, done: Callable[[list[Reply]], bool], timeout_s: float = 20.0
    ) -> list[Reply]:
        """Collect events until done(all so far) holds; fails the test on timeout."""
        events: list[Reply] = []
        deadline = time.monotonic() + timeout_s
        while True:
            events += self.call("events")["events"]
            if done(events):
                return events
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.role}: timed out; events so far: {events}")
            time.sleep(0.01)

    def kill(self) -> None:
        assert self.process.pid is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
                self.call("quit", timeout_s=10)
            self.process.join(10)
        if self.process.is_alive():
            self.kill()
        self._conn.close()


def count(events: list[Reply], kind: str) -> int:
    return sum(e["kind"] == kind for e in events)


# ---- child side --------------------------------------------------------------------------------
@dataclass
class Accounts:
    """The child's own block accounting; `errors` lists every broken exactly-once rule."""

    free: set[int]
    open: dict[str, list[int]] = field(default_factory=dict)  # reserved / being sent
    admitted: dict[str, list[int]] = field(default_factory=dict)  # sink: landed, not yet freed
    errors: list[str] = field(default_factory=list)

    def take(self, tid: str, ids: list[int]) -> None:
        if tid in self.open or not self.free.issuperset(ids):
            raise ValueError(f"{tid}: blocks {ids} not free or id in use")
        self.free.difference_update(ids)
        self.open[tid] = ids

    def end(self, tid: str, block_ids: list[int] | None, landed: bool) -> None:
        ids = self.open.pop(tid, None)
        if ids is None:
            self.errors.append(f"{tid}: ended twice or never opened")
        elif block_ids is not None and list(block_ids) != ids:
            self.errors.append(f"{tid}: event names blocks {block_ids}, reserved {ids}")
        elif landed:
            self.admitted[tid] = ids
        else:
            self.free.update(ids)


def _event(ev: Any) -> Reply:
    out: Reply = {"kind": type(ev).__name__, "tid": ev.transfer_id, "gen": ev.generation}
    if hasattr(ev, "reason"):
        out["reason"] = ev.reason.value
    if hasattr(ev, "error"):
        out["error"], out["message"] = type(ev.error).__name__, str(ev.error)
    if hasattr(ev, "block_ids"):
        out["block_ids"] = list(ev.block_ids)
    return out


class GatedTransport:
    """A SourceTransport that holds posts while closed; check() posts them once opened."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.open, self.held = inner, True, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def post(self, agent: str, generation: int, src: Any, dst: Any) -> Any:
        if self.open:
            return self.inner.post(agent, generation, src, dst)
        self.held += 1
        return {"held": (agent, generation, src, dst), "real": None}

    def check(self, op: Any) -> bool:
        if not isinstance(op, dict):
            return bool(self.inner.check(op))
        if not self.open:
            return False
        if op["real"] is None:
            op["real"] = self.inner.post(*op["held"])
        return bool(self.inner.check(op["real"]))

    def release(self, op: Any) -> bool:
        if isinstance(op, dict):
            return op["real"] is None or bool(self.inner.release(op["real"]))
        return bool(self.inner.release(op))

    def wait_spec(self, num_in_flight: int) -> tuple[list[int], float | None]:
        fds, tick = self.inner.wait_spec(num_in_flight)
        return fds, (min(tick or 1e-3, 1e-3) if num_in_flight else tick)


def _make(role: str, backend: str, kv: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    from kv_transfer import registry
    from kv_transfer.source import Source

    if role == "sink":
        return registry.make_sink(backend, kv, **options), None
    if "head_slice" in options:  # (sink rank, sink TP, staging blocks): kv_transfer/head_slice.py
        from kv_transfer.head_slice import HeadSliceSource

        rank, world, staging = options.pop("head_slice")
        return HeadSliceSource(
            kv, rank, world, staging, lambda st: registry.make_source(backend, st, **options)
        ), None
    name = "src-" + os.urandom(6).hex()  # the NIXL agent and the hello must use one name
    if backend == "nixl":
        from kv_transfer.nixl import NixlSourceTransport, NixlTuning

        tuning = NixlTuning(parts=options.pop("nixl_parts", 1))
        gate = GatedTransport(NixlSourceTransport(kv, name, tuning))
    else:
        from kv_transfer.ucx import UcxSourceTransport

        gate = GatedTransport(UcxSourceTransport(kv))
    return Source(kv, gate, agent_name=name, backend=backend, **options), gate


def child_main(
    conn: Connection, role: str, backend: str, layout: dict[str, Any], options: dict[str, Any]
) -> None:
    os.environ.update(CHILD_ENV)
    import faulthandler

    faulthandler.enable()
    import torch

    from engine.kv_cache import KVCache
    from engine.kv_layout import KVLayout

    kv = KVCache(KVLayout(**layout), torch.device("cpu"))
    endpoint, gate = _make(role, backend, kv, options)
    state = Child(role, backend, kv, endpoint, gate)
    while True:
        if conn.poll(0):
            cmd = msgpack.unpackb(conn.recv_bytes(), raw=False)
            op = cmd["op"]
            try:
                reply = state.handle(cmd)
            except Exception as e:
                reply = {"exception": f"{type(e).__name__}: {e}"}
            conn.send_bytes(msgpack.packb(reply, use_bin_type=True))
            if op == "quit":
                return
        state.record(endpoint.poll(0.002))


class Child:
    def __init__(self, role: str, backend: str, kv: Any, endpoint: Any, gate: Any) -> None:
        self.role, self.backend, self.kv, self.endpoint, self.gate = (
            role,
            backend,
            kv,
            endpoint,
            gate,
        )
        self.accounts = Accounts(free=set(range(kv.layout.num_blocks)))
        self.events: list[Reply] = []
        self.rng = random.Random(1234)

    def record(self, events: list[Any]) -> None:
        for ev in events:
            e = _event(ev)
            self.events.append(e)
            if e["kind"] in ("KVLanded", "KVReleased"):
                self.accounts.end(e["tid"], e["block_ids"], landed=e["kind"] == "KVLanded")
            elif e["kind"] in ("SendDone", "SendFailed"):
                self.accounts.end(e["tid"], None, landed=False)

    def handle(self, cmd: dict[str, Any]) -> Reply:
        op = cmd.pop("op")
        result = getattr(self, "op_" + op)(**cmd)
        return result if isinstance(result, dict) else {}

    # -- both roles --
    def op_hello(self) -> Reply:
        address = self.endpoint.address if self.role == "sink" else ""
        return {"address": address, "agent": self.endpoint.agent_name, "pid": os.getpid()}

    def op_quit(self) -> None:
        self.endpoint.close()

    def op_events(self) -> Reply:
        events, self.events = self.events, []
        return {"events": events}

    def op_pick(self, n: int, scatter: bool, avoid: list[int]) -> Reply:
        free = sorted(self.accounts.free.difference(avoid))
        ids = self.rng.sample(free, n) if scatter else free[:n]
        return {"block_ids": ids}

    def op_fill(self, block_ids: list[int], seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        data = torch.randint(0, 256, (len(block_ids), self.kv.layout.block_bytes), generator=g)
        raw = self.kv.pool.view(torch.uint8).view(self.kv.layout.num_blocks, -1)
        raw[torch.tensor(block_ids)] = data.to(torch.uint8)

    def op_digest(self, block_ids: list[int]) -> Reply:
        import torch

        raw = self.kv.pool.view(torch.uint8).view(self.kv.layout.num_blocks, -1)
        return {
            "digests": [hashlib.blake2b(raw[b].numpy().tobytes()).hexdigest() for b in block_ids]
        }

    def op_digest_heads(self, block_ids: list[int], rank: int, world: int) -> Reply:
        """Digests of kv heads [rank*H/world, (rank+1)*H/world) of each block, laid out as the
        pool of that rank holds them (what a head-sliced send must land there)."""
        import torch

        per = self.kv.layout.num_kv_heads // world
        return {
            "digests": [
                hashlib.blake2b(
                    self.kv.pool[b, :, :, :, rank * per : (rank + 1) * per]
                    .contiguous()
                    .view(-1)
                    .view(torch.uint8)
                    .numpy()
                    .tobytes()
                ).hexdigest()
                for b in block_ids
            ]
        }

    def op_account(self) -> Reply:
        a = self.accounts
        num_open = self.endpoint.num_open if self.role == "sink" else None
        return {
            "errors": a.errors,
            "free": len(a.free),
            "open": sorted(a.open),
            "admitted": sorted(a.admitted),
            "num_open": num_open,
        }

    # -- sink --
    def op_expect(self, tid: str, block_ids: list[int], lease_s: float) -> Reply:
        self.accounts.take(tid, block_ids)
        return {"handle": self.endpoint.expect(tid, block_ids, lease_s).to_wire()}

    def op_abort(self, tid: str) -> None:
        self.endpoint.abort(tid)

    def op_finish(self, tid: str) -> None:
        """The admitted request is done: its blocks go back to the free list."""
        self.accounts.free.update(self.accounts.admitted.pop(tid))

    # -- source --
    def op_send(self, sends: list[dict[str, Any]]) -> None:
        from kv_transfer.base import KVHandle

        for s in sends:
            handle = KVHandle.from_wire(s["handle"])
            self.accounts.take(handle.transfer_id, s["src"])
            self.endpoint.send(handle, s["src"])

    def op_prepare(self, handles: list[dict[str, Any]]) -> None:
        """Claim early (prefill starting); the blocks are taken by the later send."""
        from kv_transfer.base import KVHandle

        for h in handles:
            self.endpoint.prepare(KVHandle.from_wire(h))

    def op_cancel(self, handle: dict[str, Any]) -> None:
        from kv_transfer.base import KVHandle

        self.endpoint.cancel(KVHandle.from_wire(handle))

    def op_gate(self, open: bool) -> Reply:
        self.gate.open = open
        return {"held": self.gate.held}

    def op_held(self) -> Reply:
        return {"held": self.gate.held}

    def op_mismatched(self, sink_address: str, handle: dict[str, Any], **fields: Any) -> Reply:
        """A second source on a pool of another layout: connect() and send() must be refused."""
        import torch

        from engine.kv_cache import KVCache
        from engine.kv_layout import KVLayout
        from kv_transfer import registry
        from kv_transfer.base import KVHandle, KVTransferError

        layout = KVLayout(**{**dataclasses.asdict(self.kv.layout), **fields})
        other = registry.make_source(self.backend, KVCache(layout, torch.device("cpu")))
        try:
            try:
                other.connect(sink_address, timeout_s=10)
                connect_error = None
            except KVTransferError as e:
                connect_error = {"error": type(e).__name__, "message": str(e)}
            h = KVHandle.from_wire(handle)
            other.send(h, list(range(len(h.block_ids))))
            deadline, events = time.monotonic() + 10, []
            while not events and time.monotonic() < deadline:
                events = other.poll(0.05)
            return {"connect": connect_error, "events": [_event(e) for e in events]}
        finally:
            other.close()
