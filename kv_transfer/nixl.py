"""NIXL backend: one-sided WRITEs with a completion notification (package nixl-cu13, UCX plugin).

Memory type and device come from the pool tensor (CPU -> DRAM, CUDA -> VRAM). Metadata goes one
way: the source loads the sink's agent metadata from the welcome message; the sink never loads
the source's, it only receives notifications from it.

No progress thread (it busy-polls a core: NIXL hard-codes pthrDelay=0). So the passive sink must
call into NIXL for wire-up and to receive notifications: it does so every `progress_interval_s`
while a granted transfer's source has said `write` (it posts right after), and not at all
otherwise (a claim made when prefill starts may wait a whole prefill for its write). That
tick bounds the latency the sink adds to a landing; 0.2 ms (DRAM) costs ~5 k wakeups/s and
20 us (VRAM, where a write lasts about a millisecond) ~50 k/s, only while writes run. See
NixlTuning / default_tuning.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from engine.kv_cache import KVCache
from kv_transfer.base import BackendUnavailable, HandshakeFailed, PeerLost, TransferFailed
from kv_transfer.ledger import Phase, SinkLedger
from kv_transfer.sink import Sink
from kv_transfer.source import Source
from kv_transfer.transport import Arrival, PoolInfo

try:
    import nixl_cu13._bindings as nixl_bindings
    from nixl_cu13._api import nixl_agent, nixl_agent_config
except ImportError as e:  # the registry turns this into a clear message
    raise BackendUnavailable(
        "the 'nixl' KV transfer backend needs nixl-cu13: pip install -e '.[kv]'"
    ) from e

NAME = "nixl"


@dataclass(frozen=True, slots=True)
class NixlTuning:
    """How a NIXL endpoint drives UCX. Built once by make_sink/make_source.

    num_threads: NIXL's UCX thread pool (its dedicated threads sleep while idle). A WRITE of at
        least `split_batch_size` descriptors is cut into one chunk per thread, each posted by its
        own thread on its own UCX worker (for VRAM: its own cuda_ipc stream), so posting and
        copies run in parallel. 0: the caller's thread posts every descriptor.
    progress_interval_s: how often an endpoint calls into NIXL while a write may be in flight
        (see the module docstring).
    """

    num_threads: int = 0
    split_batch_size: int = 1024
    progress_interval_s: float = 2e-4
    sgl: bool = False  # UCX scatter-gather offload: a WRITE's descriptors go out as one list
    # Prepared descriptor lists: one descriptor per block of each pool, prepared once (ours at
    # start, a sink's at its handshake); a WRITE then names blocks by index (make_prepped_xfer)
    # instead of NIXL building, checking and looking up fresh descriptors on every post.
    prepped: bool = False
    # How many NIXL WRITEs one transfer is cut into (consecutive slices of its blocks, posted
    # back to back, each with its own notification; the sink reports the landing once all
    # `parts` notifications came). Measured with SGL on VRAM: a WRITE's copy ends a full copy
    # time after transfer() returns (posting and copying do not overlap within one WRITE); cut
    # in parts, the copy of one part overlaps the posting of the next.
    parts: int = 1


def default_tuning(memory: str) -> NixlTuning:
    """By pool memory ("DRAM" | "VRAM"), from the sweep in docs/benchmarks.md ("GPU: what moves
    the KV fastest"). VRAM: scatter-gather offload, which takes UCX's per-descriptor cost off the
    critical path (3,000 tokens as 188 scattered 2 MiB blocks: 2.40 -> 2.05 ms; the copy then
    runs at the link's speed), and a 20 us tick, which trims the wait between the copy's end and
    the notification going out and being seen (2.65 -> 2.40 ms); a write lasts ~1-20 ms, so the
    ticking is short. NIXL's thread pool did not help (2.5 ms with 2-8 threads). Prepared
    descriptor lists take NIXL's per-post descriptor checks off the path (with early claims,
    3,000 tokens 1.78 -> 1.74 ms, 1,000 tokens 1.14 -> 0.90 ms; docs/benchmarks.md, "GPU: early
    claims"). Four parts per transfer: UCX posts one part's list while the copy of the previous
    one runs, instead of copying only after posting all 188 descriptors (3,000 tokens 1.62 ->
    1.43 ms, 8,000 3.41 -> 3.13, 32,000 12.50 -> 11.40; 1,000 tokens, 63 descriptors, 0.73 ->
    0.83 ms: the fixed cost of four posts; 2 parts: 1.53, 8 parts: 1.46 ms; docs/benchmarks.md,
    "GPU: a transfer in parts"). DRAM: as measured on the 2-core CPU box (the caller posts; 0.2
    ms tick; one part: parts were not measured on DRAM)."""
    if memory == "VRAM":
        return NixlTuning(progress_interval_s=2e-5, sgl=True, prepped=True, parts=4)
    return NixlTuning()


_NOTIF_PREFIX = b"tandem-kv1:"
# Every exception the bindings raise (they all derive from Exception directly).
_NIXL_ERRORS = tuple(
    getattr(nixl_bindings, n)
    for n in dir(nixl_bindings)
    if n.startswith("nixl") and n.endswith("Error")
)


def _agent(name: str, tuning: NixlTuning) -> Any:
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
    # NIXL has no backend parameter for it: its UCX backend reads this variable when created.
    os.environ["NIXL_UCX_SGL_ENABLE"] = "1" if tuning.sgl else "0"
    params = {}
    if tuning.num_threads:  # NIXL's UCX thread-pool engine: one UCX worker per thread
        params = {
            "num_threads": str(tuning.num_threads),
            "split_batch_size": str(tuning.split_batch_size),
        }
    agent.create_backend("UCX", params)
    return agent


def _register(agent: Any, pool: PoolInfo) -> Any:
    region = [(pool.base_address, pool.block_bytes * pool.num_blocks, pool.device_id, "")]
    return agent.register_memory(region, pool.memory)


def _prep_blocks(agent: Any, owner: str, pool: PoolInfo) -> Any:
    """A prepared list of one descriptor per block of `pool` (owner: a remote agent's name or
    NIXL_INIT_AGENT for ours), in the strided form: one row says num_blocks x block_bytes."""
    row = [pool.base_address, pool.block_bytes, pool.device_id, pool.block_bytes, pool.num_blocks]
    return agent.prep_xfer_dlist(owner, np.array([row], dtype=np.uint64), pool.memory)


def _notif(generation: int, part: int, parts: int) -> bytes:
    """A WRITE's notification: `tandem-kv1:<gen>` for a whole transfer, or
    `tandem-kv1:<gen>:<part>/<parts>` for one of its parts."""
    tail = f"{generation}" if parts == 1 else f"{generation}:{part}/{parts}"
    return _NOTIF_PREFIX + tail.encode()


class NixlSinkTransport:
    one_sided = True

    def __init__(self, kv: KVCache, agent_name: str, tuning: NixlTuning) -> None:
        self._pool = PoolInfo.of(kv.pool, kv.layout.block_bytes)
        self._agent = _agent(agent_name, tuning)
        self._registration = _register(self._agent, self._pool)
        self._tick = tuning.progress_interval_s
        # Transfers sent in parts: generation -> the parts whose notification came. An entry
        # goes when the last part lands, or when the ledger no longer holds its transfer as
        # granted (fenced, expired: generations are never reused, so it can never count for
        # another transfer).
        self._parts_seen: dict[int, set[int]] = {}

    def describe(self) -> dict[str, Any]:
        return {"metadata": self._agent.get_agent_metadata(), "pool": asdict(self._pool)}

    def progress(self, ledger: SinkLedger) -> list[Arrival]:
        arrivals = []
        for agent, messages in self._agent.get_new_notifs().items():
            for msg in messages:
                if not msg.startswith(_NOTIF_PREFIX):
                    continue
                generation, part, parts = _parse_notif(msg[len(_NOTIF_PREFIX) :])
                if parts > 1:
                    seen = self._parts_seen.setdefault(generation, set())
                    seen.add(part)
                    if len(seen) < parts:
                        continue  # the transfer lands with its last part
                    del self._parts_seen[generation]
                t = ledger.get(generation)
                num_bytes = t.num_blocks * self._pool.block_bytes if t is not None else 0
                arrivals.append(Arrival(generation, str(agent), num_bytes))
        for generation in [g for g in self._parts_seen if not _granted(ledger, g)]:
            del self._parts_seen[generation]
        return arrivals

    def wait_spec(self, ledger: SinkLedger) -> tuple[list[int], float | None]:
        return [], self._tick if ledger.num_writing else None

    def peer_gone(self, agent: str) -> None:
        pass  # we never loaded its metadata

    def close(self) -> None:
        self._agent.deregister_memory(self._registration)


def _parse_notif(tail: bytes) -> tuple[int, int, int]:
    """(generation, part, parts) of a notification's tail (see _notif)."""
    gen, _, part = tail.partition(b":")
    if not part:
        return int(gen), 0, 1
    index, _, parts = part.partition(b"/")
    return int(gen), int(index), int(parts)


def _granted(ledger: SinkLedger, generation: int) -> bool:
    t = ledger.get(generation)
    return t is not None and t.phase is Phase.GRANTED


@dataclass(slots=True)
class _Op:
    """One transfer's NIXL WRITEs (its parts). `error`: a later part could not be posted; the
    earlier ones may still run, so check() reports it only once they are all over."""

    handles: list[Any]
    done: list[bool]
    released: list[bool]
    error: TransferFailed | None = None


class NixlSourceTransport:
    def __init__(self, kv: KVCache, agent_name: str, tuning: NixlTuning) -> None:
        self._pool = PoolInfo.of(kv.pool, kv.layout.block_bytes)
        self._agent = _agent(agent_name, tuning)
        self._registration = _register(self._agent, self._pool)
        self._tick = tuning.progress_interval_s
        self._remotes: dict[str, PoolInfo] = {}
        self._prepped = tuning.prepped
        self._parts = tuning.parts
        self._local_dlist = _prep_blocks(self._agent, "", self._pool) if self._prepped else None
        self._remote_dlists: dict[str, Any] = {}  # by agent, when prepped

    def describe(self) -> dict[str, Any]:
        return {}

    def add_peer(self, agent: str, info: dict[str, Any]) -> None:
        try:
            remote = PoolInfo(**info["pool"])
            loaded = self._agent.add_remote_agent(bytes(info["metadata"]))
        except (KeyError, TypeError, *_NIXL_ERRORS) as e:
            raise HandshakeFailed(f"unusable NIXL description from {agent}: {e}") from e
        name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if name != agent or remote.block_bytes != self._pool.block_bytes:
            raise HandshakeFailed(f"sink {agent} sent metadata of {name} / a different block size")
        self._remotes[agent] = remote
        if self._prepped:
            try:
                self._remote_dlists[agent] = _prep_blocks(self._agent, agent, remote)
            except _NIXL_ERRORS as e:
                self.remove_peer(agent)
                raise HandshakeFailed(f"cannot prepare {agent}'s blocks: {e}") from e

    def remove_peer(self, agent: str) -> None:
        dlist = self._remote_dlists.pop(agent, None)
        if dlist is not None:
            with contextlib.suppress(*_NIXL_ERRORS):
                self._agent.release_dlist_handle(dlist)
        if self._remotes.pop(agent, None) is not None:
            with contextlib.suppress(*_NIXL_ERRORS):  # already disconnected: nothing to tear down
                self._agent.remove_remote_agent(agent)

    def post(self, agent: str, generation: int, src: np.ndarray, dst: np.ndarray) -> _Op:
        remote = self._remotes[agent]
        if int(dst.max()) >= remote.num_blocks or int(dst.min()) < 0:
            raise TransferFailed(f"destination blocks beyond {agent}'s pool of {remote.num_blocks}")
        parts = max(1, min(self._parts, len(src)))
        op = _Op([], [], [])
        slices = zip(np.array_split(src, parts), np.array_split(dst, parts), strict=True)
        for part, (s, d) in enumerate(slices):
            handle = None
            try:
                handle = self._make(agent, remote, s, d, _notif(generation, part, parts))
                state = self._agent.transfer(handle)
                error = (
                    None if state != "ERR" else TransferFailed(f"NIXL refused the WRITE to {agent}")
                )
            except _NIXL_ERRORS as e:
                state, error = "ERR", _failure(agent, e)
            if handle is not None:
                op.handles.append(handle)
                op.done.append(state != "PROC")  # DONE, or ERR: nothing of it runs
                op.released.append(False)
            if error is None:
                continue
            if part == 0:  # nothing in flight: give up now
                self.release(op)
                raise error
            op.error = error  # earlier parts are in flight: check() reports it once over
            break
        return op

    def _make(
        self, agent: str, remote: PoolInfo, src: np.ndarray, dst: np.ndarray, notif: bytes
    ) -> Any:
        if self._prepped:  # blocks by index; NIXL merges neighbours itself
            return self._agent.make_prepped_xfer(
                "WRITE",
                self._local_dlist,
                src.astype(np.int32),
                self._remote_dlists[agent],
                dst.astype(np.int32),
                notif,
            )
        local, dest = self._descriptors(remote, src, dst)
        return self._agent.initialize_xfer(
            "WRITE",
            self._agent.get_xfer_descs(local, self._pool.memory),
            self._agent.get_xfer_descs(dest, remote.memory),
            agent,
            notif,
        )

    def _descriptors(
        self, remote: PoolInfo, src: np.ndarray, dst: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """[num_runs, (address, bytes, device)] for both sides: blocks consecutive on both
        sides coalesce into one descriptor (transport.paired_runs, vectorized)."""
        starts = np.flatnonzero(np.concatenate(([True], (np.diff(src) != 1) | (np.diff(dst) != 1))))
        n = np.diff(np.append(starts, len(src))).astype(np.uint64)
        bb = np.uint64(self._pool.block_bytes)
        local = np.empty((len(starts), 3), dtype=np.uint64)
        local[:, 0] = self._pool.base_address + src[starts].astype(np.uint64) * bb
        local[:, 1] = n * bb
        local[:, 2] = self._pool.device_id
        dest = local.copy()
        dest[:, 0] = remote.base_address + dst[starts].astype(np.uint64) * bb
        dest[:, 2] = remote.device_id
        return local, dest

    def check(self, op: object) -> bool:
        assert isinstance(op, _Op)
        for i, handle in enumerate(op.handles):
            if op.done[i]:
                continue
            try:
                state = self._agent.check_xfer_state(handle)
            except _NIXL_ERRORS as e:
                op.done[i] = True
                raise _failure("the sink", e) from e
            if state == "ERR":
                op.done[i] = True
                raise TransferFailed("NIXL reported the WRITE failed")
            op.done[i] = state == "DONE"
        if not all(op.done):
            return False
        if op.error is not None:
            raise op.error
        return True

    def release(self, op: object) -> bool:
        """Release every part; False while one is still running (try again later)."""
        assert isinstance(op, _Op)
        for i, handle in enumerate(op.handles):
            if op.released[i]:
                continue
            try:
                self._agent.release_xfer_handle(handle)
            except _NIXL_ERRORS:
                continue  # still running and not cancellable
            op.released[i] = True
        return all(op.released)

    def wait_spec(self, num_in_flight: int) -> tuple[list[int], float | None]:
        return [], self._tick if num_in_flight else None

    def close(self) -> None:
        for agent in list(self._remotes):
            self.remove_peer(agent)
        if self._local_dlist is not None:
            self._agent.release_dlist_handle(self._local_dlist)
        self._agent.deregister_memory(self._registration)


def _failure(agent: str, e: Exception) -> TransferFailed:
    if isinstance(e, nixl_bindings.nixlRemoteDisconnectError):
        return PeerLost(f"{agent} disconnected: {e}")
    return TransferFailed(f"NIXL error writing to {agent}: {e}")


def make_sink(
    kv: KVCache,
    *,
    agent_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    peer_loss_grace_s: float = 0.05,
    tuning: NixlTuning | None = None,
) -> Sink:
    name = agent_name or f"kv-sink-{uuid.uuid4().hex[:12]}"
    memory = PoolInfo.of(kv.pool, kv.layout.block_bytes).memory
    transport = NixlSinkTransport(kv, name, tuning or default_tuning(memory))
    return Sink(
        kv,
        transport,
        agent_name=name,
        backend=NAME,
        host=host,
        port=port,
        peer_loss_grace_s=peer_loss_grace_s,
    )


def make_source(
    kv: KVCache,
    *,
    agent_name: str | None = None,
    handshake_timeout_s: float = 10.0,
    tuning: NixlTuning | None = None,
) -> Source:
    name = agent_name or f"kv-source-{uuid.uuid4().hex[:12]}"
    memory = PoolInfo.of(kv.pool, kv.layout.block_bytes).memory
    transport = NixlSourceTransport(kv, name, tuning or default_tuning(memory))
    return Source(
        kv, transport, agent_name=name, backend=NAME, handshake_timeout_s=handshake_timeout_s
    )
