"""KV transfer between two processes: latency and bandwidth of one request's KV.

    python -m bench.kv_transfer --backend nixl --tokens 1000,3000,8000,32000 \\
        --layout llama-3.1-8b --json

A sink process (decode side) and a source process (prefill side) each own a KVCache. For every
token count the request's blocks are scattered over both pools (random, non-contiguous ids), so
every block is its own descriptor. Latency is measured inside the children on the system-wide
monotonic clock: from the source's send() call to the sink observing KVLanded (the write, the
notification and the sink's wake-up are all in it). The first transfer of each size is a warm-up
and is checked byte for byte on a sample of blocks.

--claim early (the default, what prefill_worker does): the source claims the lease with
KVSource.prepare() when the handle arrives, i.e. while prefill computes, and the timed send()
needs no round trip; the claim's own round trip is reported apart (claim_ms). --claim late:
send() claims, and the round trip is inside the latency (the measure before early claims).

--mode staged measures the alternative to many descriptors: the source packs its scattered
blocks into a contiguous staging range, ships one run, and the sink unpacks it; the pack and
unpack copies are inside the measured latency.

--device cuda puts both pools in GPU memory (source on cuda:0, sink on cuda:1 when there are
two GPUs); NIXL then registers VRAM. Nothing here assumes CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np

# name -> (model, num_layers, num_kv_heads, head_dim, block_size, default dtype). llama-3.1-8b
# is bf16 on CPU too: the bytes per block are then those a GPU deployment moves (2 MiB).
LAYOUTS: dict[str, tuple[str, int, int, int, int, str]] = {
    "llama-3.1-8b": ("llama-3.1-8b", 32, 8, 128, 16, "bfloat16"),
    "smollm2": ("smollm2-135m", 30, 3, 64, 16, "float32"),
    "tiny": ("tiny-llama", 4, 2, 64, 16, "float32"),
}


def _layout(args: argparse.Namespace, num_blocks: int) -> dict[str, Any]:
    model, layers, heads, dim, block, dtype = LAYOUTS[args.layout]
    return {
        "model": model,
        "dtype": args.dtype or dtype,
        "num_blocks": num_blocks,
        "block_size": block,
        "num_layers": layers,
        "num_kv_heads": heads,
        "head_dim": dim,
    }


# ---- child processes -----------------------------------------------------------------------------
def _child(
    conn: Connection,
    role: str,
    backend: str,
    layout: dict[str, Any],
    device: str,
    options: dict[str, Any],
) -> None:
    import torch

    from engine.kv_cache import KVCache
    from engine.kv_layout import KVLayout
    from kv_transfer import registry
    from kv_transfer.base import KVHandle, KVLanded, SendDone, SendFailed

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:  # one copy thread per process, like the CMA copy; 2-thread OpenMP spins on 2 cores
        torch.set_num_threads(1)
    kv = KVCache(KVLayout(**layout), dev)
    raw = kv.pool.view(torch.uint8).view(kv.layout.num_blocks, -1)  # [blocks, block_bytes]
    if role == "source":  # a distinct, cheap pattern per block; also faults every page in
        raw[:, :] = (torch.arange(raw.shape[0], device=dev) % 251 + 1).to(torch.uint8)[:, None]
        raw[:, :8] = torch.randint(0, 256, (raw.shape[0], 8), device=dev, dtype=torch.uint8)
    else:
        raw.fill_(0)
    if "tuning" in options:  # nixl: overrides of the pool memory's default NixlTuning
        from kv_transfer.nixl import default_tuning

        memory = "VRAM" if kv.pool.is_cuda else "DRAM"
        tuning = dataclasses.replace(default_tuning(memory), **options["tuning"])
        options = {**options, "tuning": tuning}
    factory = registry.make_sink if role == "sink" else registry.make_source
    endpoint: Any = factory(backend, kv, **options)
    # generation -> (post() called, post() returned, in NIXL's initialize_xfer, in transfer())
    posts: dict[int, tuple[float, float, float, float]] = {}
    transport = getattr(endpoint, "_transport", None)
    if role == "source" and transport is not None:  # time the claim round trip and the post
        post, spent = transport.post, {"initialize_xfer": 0.0, "transfer": 0.0}
        nixl = getattr(transport, "_agent", None)
        for method in spent if nixl is not None else []:
            setattr(nixl, method, _stopwatch(getattr(nixl, method), spent, method))

        def timed_post(agent: str, generation: int, src: Any, dst: Any) -> object:
            spent.update(initialize_xfer=0.0, transfer=0.0)  # summed over a transfer's parts
            t0 = time.monotonic()
            op = post(agent, generation, src, dst)
            t1 = time.monotonic()
            posts[generation] = (t0, t1, spent["initialize_xfer"], spent["transfer"])
            return op

        transport.post = timed_post
    claims: dict[int, float] = {}  # generation -> when the sink granted it
    ledger = getattr(endpoint, "_ledger", None)
    if role == "sink" and ledger is not None:
        claim = ledger.claim

        def timed_claim(generation: int, *args: Any) -> Any:
            claims[generation] = time.monotonic()
            return claim(generation, *args)

        ledger.claim = timed_claim
    pending: dict[str, dict[str, Any]] = {}  # tid -> what to do / what happened
    prepared: dict[str, Any] = {}  # tid -> the KVHandle given to prepare(), for its send()
    results: dict[str, dict[str, Any]] = {}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def on_events(events: list[Any]) -> None:
        for ev in events:
            p = pending.pop(ev.transfer_id, None)
            if p is None:  # KVReleased after KVLost: already recorded
                continue
            if isinstance(ev, KVLanded) and p["unpack_to"] is not None:
                _unpack(raw, p["staging"], p["unpack_to"])
                sync()
            ok = isinstance(ev, KVLanded | SendDone)
            err = str(ev.error) if isinstance(ev, SendFailed) else type(ev).__name__
            t_post = posts.pop(ev.generation, (0.0, 0.0, 0.0, 0.0))
            results[ev.transfer_id] = {
                "t": time.monotonic(),
                "ok": ok,
                "what": err,
                "t_post": t_post,
                "t_claim": claims.pop(ev.generation, 0.0),
            }

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "hello":
            return {"address": getattr(endpoint, "address", ""), "pid": os.getpid()}
        if op == "expect":
            h = endpoint.expect(cmd["tid"], cmd["block_ids"], 120.0)
            pending[cmd["tid"]] = {
                "unpack_to": cmd.get("unpack_to"),
                "staging": cmd["block_ids"][0],
            }
            return {"handle": h.to_wire()}
        if op == "prepare":  # claim now and wait for the grant (prefill would compute meanwhile)
            handle = prepared[cmd["handle"]["transfer_id"]] = KVHandle.from_wire(cmd["handle"])
            t0 = time.monotonic()
            endpoint.prepare(handle)
            while True:
                peer = endpoint._peers.get(handle.sink_address)
                s = peer.sends.get(handle.generation) if peer is not None else None
                if s is None or s.stage.value == "granted":
                    break
                on_events(endpoint.poll(0.0002))
            if s is None:
                raise RuntimeError(f"claim of {handle.transfer_id} failed")
            return {"claim_s": time.monotonic() - t0}
        if op == "send":
            # The handle as prefill_worker holds it: decoded when the request arrived (and the
            # very object given to prepare()), so neither decoding nor comparing is timed.
            tid = cmd["handle"]["transfer_id"]
            handle = prepared.pop(tid, None) or KVHandle.from_wire(cmd["handle"])
            pending[tid] = {"unpack_to": None}
            t0 = time.monotonic()
            src = cmd["src"]
            if cmd.get("pack_at") is not None:  # gather into one contiguous run first
                at = cmd["pack_at"]
                area, stage = raw[:at], raw[at:]  # disjoint views: one gather, no temporary
                torch.index_select(area, 0, torch.tensor(src, device=dev), out=stage[: len(src)])
                sync()
                src = list(range(at, at + len(src)))
            endpoint.send(handle, src)
            return {"t_send": t0}
        if op == "result":
            return results.pop(cmd["tid"], {})
        if op == "digest":
            rows = raw[torch.tensor(cmd["block_ids"], device=dev)].cpu().numpy()
            return {"digests": [hashlib.blake2b(r.tobytes()).hexdigest() for r in rows]}
        if op == "idle_cpu":  # an open, unclaimed lease: the sink should sleep, not spin
            endpoint.expect("idle", cmd["block_ids"], 60.0)
            c0, t0 = time.process_time(), time.monotonic()
            endpoint.poll(cmd["seconds"])
            cpu = (time.process_time() - c0) / (time.monotonic() - t0)
            endpoint.abort("idle")
            endpoint.poll(0.1)
            return {"cpu_fraction": cpu}
        raise ValueError(f"unknown command {op!r}")

    while True:
        if conn.poll(0):
            cmd = msgpack.unpackb(conn.recv_bytes(), raw=False)
            if cmd["op"] == "quit":
                endpoint.close()
                conn.send_bytes(msgpack.packb({}))
                return
            conn.send_bytes(msgpack.packb(handle(cmd), use_bin_type=True))
        on_events(endpoint.poll(0.005))


def _stopwatch(fn: Any, spent: dict[str, float], key: str) -> Any:
    """fn, which adds each call's duration (seconds) to spent[key]."""

    def timed(*args: Any) -> Any:
        t = time.monotonic()
        try:
            return fn(*args)
        finally:
            spent[key] += time.monotonic() - t

    return timed


def _unpack(raw: Any, staging: int, dst: list[int]) -> None:
    """Scatter the staged run raw[staging:] into blocks dst. On CPU torch's index_copy_ and
    index_put_ run at ~2 GiB/s; a copy_ per block runs at memcpy speed (~11 GiB/s here)."""
    import torch

    area, stage = raw[:staging], raw[staging:]  # disjoint views: torch allows one copy
    if raw.is_cuda:
        area.index_copy_(0, torch.tensor(dst, device=raw.device), stage[: len(dst)])
        return
    for i, block in enumerate(dst):
        area[block].copy_(stage[i])


class _Peer:
    def __init__(
        self, role: str, backend: str, layout: dict[str, Any], device: str, options: dict[str, Any]
    ) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        args = (child, role, backend, layout, device, options)
        self.process = ctx.Process(target=_child, args=args)
        self.process.start()
        child.close()

    def call(self, op: str, timeout_s: float = 600.0, **args: Any) -> dict[str, Any]:
        self._conn.send_bytes(msgpack.packb({"op": op, **args}, use_bin_type=True))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"no answer to {op!r} in {timeout_s} s")
        reply: dict[str, Any] = msgpack.unpackb(self._conn.recv_bytes(), raw=False)
        return reply

    def wait_result(self, tid: str, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not (r := self.call("result", tid=tid)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{tid} did not finish in {timeout_s} s")
            time.sleep(0.002)
        return r

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("quit", timeout_s=30)
            finally:
                self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# ---- the measurement -----------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    mode: str
    tokens: int
    num_blocks: int
    num_bytes: int
    num_descriptors: int
    latency_ms: list[float]
    source_done_ms: list[float]
    claim_seen_ms: list[float]
    post_called_ms: list[float]
    post_returned_ms: list[float]
    in_initialize_xfer_ms: list[float]
    in_transfer_ms: list[float]
    claim_ms: list[float]
    verified: bool

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_ms)
        med = statistics.median(lat)
        gib = self.num_bytes / 2**30
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "blocks": self.num_blocks,
            "bytes": self.num_bytes,
            "descriptors": self.num_descriptors,
            "latency_ms": {"min": lat[0], "median": med, "max": lat[-1]},
            "bandwidth_gib_s": {"median": gib / (med / 1e3), "best": gib / (lat[0] / 1e3)},
            "source_done_ms_median": statistics.median(self.source_done_ms),
            "claim_seen_ms_median": statistics.median(self.claim_seen_ms),
            "post_called_ms_median": statistics.median(self.post_called_ms),
            "post_returned_ms_median": statistics.median(self.post_returned_ms),
            "in_initialize_xfer_ms_median": statistics.median(self.in_initialize_xfer_ms),
            "in_transfer_ms_median": statistics.median(self.in_transfer_ms),
            "claim_ms_median": statistics.median(self.claim_ms) if self.claim_ms else None,
            "verified_byte_for_byte": self.verified,
            "repeats": len(lat),
        }


def _one(
    sink: _Peer,
    source: _Peer,
    tid: str,
    src: list[int],
    dst: list[int],
    staging: int | None,
    early_claim: bool,
) -> dict[str, float]:
    if staging is None:
        handle = sink.call("expect", tid=tid, block_ids=dst)["handle"]
    else:
        landing = list(range(staging, staging + len(dst)))
        handle = sink.call("expect", tid=tid, block_ids=landing, unpack_to=dst)["handle"]
    claim_s = source.call("prepare", handle=handle)["claim_s"] if early_claim else float("nan")
    pack = {} if staging is None else {"pack_at": staging}
    t_send = source.call("send", tid=tid, handle=handle, src=src, **pack)["t_send"]
    landed, done = sink.wait_result(tid), source.wait_result(tid)
    if not (landed["ok"] and done["ok"]):
        raise RuntimeError(f"{tid} failed: sink {landed['what']}, source {done['what']}")
    p0, p1, in_init, in_transfer = done["t_post"]
    return {  # ms after send(): landed at the sink, write over at the source, post() called
        "landed": (landed["t"] - t_send) * 1e3,  # and returned (claim round trip, post cost)
        "done": (done["t"] - t_send) * 1e3,
        "claim_seen": (landed["t_claim"] - t_send) * 1e3 if landed["t_claim"] else float("nan"),
        "post_called": (p0 - t_send) * 1e3 if p0 else float("nan"),
        "post_returned": (p1 - t_send) * 1e3 if p1 else float("nan"),
        "in_initialize_xfer": in_init * 1e3,  # ms inside post() (nixl only)
        "in_transfer": in_transfer * 1e3,
        "claim": claim_s * 1e3,  # prepare() to the grant, before send() (early claims only)
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tokens = [int(t) for t in args.tokens.split(",")]
    block_size = LAYOUTS[args.layout][4]
    max_blocks = max(math.ceil(t / block_size) for t in tokens)
    modes = ["direct", "staged"] if args.mode == "both" else [args.mode]
    scatter_blocks = args.pool_blocks or max_blocks + max(64, max_blocks // 4)
    staging = scatter_blocks if "staged" in modes else None  # staging range after the scatter area
    layout = _layout(args, scatter_blocks + (max_blocks if staging is not None else 0))
    source_dev = args.source_device or ("cuda:0" if args.device == "cuda" else "cpu")
    sink_dev = args.sink_device or (
        "cuda:1" if args.device == "cuda" and _gpus() > 1 else source_dev
    )
    options: dict[str, Any] = {}
    overrides = {  # of the nixl backend's default tuning for the pool's memory
        "num_threads": args.nixl_threads,
        "split_batch_size": args.nixl_split,
        "progress_interval_s": None
        if args.progress_interval_us is None
        else args.progress_interval_us * 1e-6,
        "sgl": None if args.nixl_sgl is None else bool(args.nixl_sgl),
        "prepped": None if args.nixl_prepped is None else bool(args.nixl_prepped),
        "parts": args.nixl_parts,
    }
    if args.backend == "nixl":
        options["tuning"] = {k: v for k, v in overrides.items() if v is not None}
    sink = _Peer("sink", args.backend, layout, sink_dev, options)
    source = _Peer("source", args.backend, layout, source_dev, options)
    rng = np.random.default_rng(args.seed)
    rows = []
    try:
        sink.call("hello")
        source.call("hello")
        for mode in modes:
            for n_tokens in tokens:
                n = math.ceil(n_tokens / block_size)
                row = Row(mode, n_tokens, n, 0, 0, [], [], [], [], [], [], [], [], False)
                for rep in range(1 + args.repeat):
                    src = _pick(rng, scatter_blocks, n, args.block_runs)
                    dst = _pick(rng, scatter_blocks, n, args.block_runs)
                    tid = f"{mode}-{n_tokens}-{rep}"
                    staged = staging if mode == "staged" else None
                    times = _one(sink, source, tid, src, dst, staged, args.claim == "early")
                    if rep == 0:  # warm-up: connection wire-up; check the bytes
                        sample = rng.choice(n, min(n, 16), replace=False).tolist()
                        row.verified = (
                            sink.call("digest", block_ids=[dst[i] for i in sample])["digests"]
                            == source.call("digest", block_ids=[src[i] for i in sample])["digests"]
                        )
                        continue
                    row.latency_ms.append(times["landed"])
                    row.source_done_ms.append(times["done"])
                    row.claim_seen_ms.append(times["claim_seen"])
                    row.post_called_ms.append(times["post_called"])
                    row.post_returned_ms.append(times["post_returned"])
                    row.in_initialize_xfer_ms.append(times["in_initialize_xfer"])
                    row.in_transfer_ms.append(times["in_transfer"])
                    if args.claim == "early":
                        row.claim_ms.append(times["claim"])
                from kv_transfer.transport import paired_runs

                row.num_descriptors = 1 if mode == "staged" else len(paired_runs(src, dst))
                row.num_bytes = n * _block_bytes(layout)
                rows.append(row.summary())
                print(_line(rows[-1]), file=sys.stderr, flush=True)
        idle = sink.call("idle_cpu", block_ids=[0], seconds=1.0)["cpu_fraction"]
    finally:
        source.stop()
        sink.stop()
    return {
        "benchmark": "kv_transfer",
        "backend": args.backend,
        "layout": layout,
        "block_bytes": _block_bytes(layout),
        "source_device": source_dev,
        "sink_device": sink_dev,
        "scatter": _scatter_text(args.block_runs),
        "claim": args.claim,
        "nixl_tuning_overrides": options.get("tuning", {}),
        "ucx_env": {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "NIXL_"))},
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus",
        "date": datetime.date.today().isoformat(),
        "sink_idle_cpu_percent": 100 * idle,
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "results": rows,
    }


def _pick(rng: np.random.Generator, pool: int, n: int, run: int) -> list[int]:
    """n distinct block ids out of `pool`: runs of `run` consecutive ids at random places in
    random order (run=1: every block on its own; run=0: one contiguous range)."""
    if run == 0:
        start = int(rng.integers(0, pool - n + 1))
        return list(range(start, start + n))
    slots = rng.choice(pool // run, math.ceil(n / run), replace=False).tolist()
    return [s * run + i for s in slots for i in range(run)][:n]


def _block_bytes(layout: dict[str, Any]) -> int:
    from engine.kv_layout import KVLayout

    return KVLayout(**layout).block_bytes


def _scatter_text(run: int) -> str:
    if run == 0:
        return "one contiguous range on each side (one descriptor)"
    if run == 1:
        return "random distinct block ids on both sides (one descriptor per block)"
    return f"runs of {run} consecutive blocks at random places on both sides"


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['mode']:>6} {r['tokens']:>6} tok {r['bytes'] / 2**20:8.1f} MiB "
        f"{r['descriptors']:>5} desc  latency median {r['latency_ms']['median']:8.2f} ms "
        f"(min {r['latency_ms']['min']:.2f})  {r['bandwidth_gib_s']['median']:6.2f} GiB/s "
        f"(best {r['bandwidth_gib_s']['best']:.2f})  claim seen {r['claim_seen_ms_median']:.2f} "
        f"(early claim {r['claim_ms_median'] or float('nan'):.2f}), "
        f"post called/returned "
        f"{r['post_called_ms_median']:.2f}/{r['post_returned_ms_median']:.2f} ms (NIXL init "
        f"{r['in_initialize_xfer_ms_median']:.2f}, transfer {r['in_transfer_ms_median']:.2f}), "
        f"source done "
        f"{r['source_done_ms_median']:.2f} ms  verified={r['verified_byte_for_byte']}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.kv_transfer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--backend", default="nixl", choices=["nixl", "ucx"])
    p.add_argument(
        "--tokens", default="1000,3000,8000,32000", help="comma-separated prompt lengths"
    )
    p.add_argument("--layout", default="llama-3.1-8b", choices=sorted(LAYOUTS))
    p.add_argument("--dtype", default=None, help="override the layout's dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--source-device", default=None, help="e.g. cuda:0 (default from --device)")
    p.add_argument("--sink-device", default=None, help="e.g. cuda:1 (default from --device)")
    p.add_argument("--repeat", type=int, default=5, help="measured transfers per size (+1 warm-up)")
    p.add_argument("--mode", default="direct", choices=["direct", "staged", "both"])
    p.add_argument(
        "--pool-blocks", type=int, default=0, help="blocks to scatter over (default: fit)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--progress-interval-us",
        type=float,
        default=None,
        help="nixl progress tick (default: 200 DRAM, 20 VRAM)",
    )
    p.add_argument(
        "--nixl-threads", type=int, default=None, help="NIXL UCX thread pool size (0: none)"
    )
    p.add_argument(
        "--nixl-split", type=int, default=None, help="split a WRITE of >= this many descriptors"
    )
    p.add_argument(
        "--nixl-sgl", type=int, choices=[0, 1], default=None, help="UCX scatter-gather offload"
    )
    p.add_argument(
        "--nixl-prepped",
        type=int,
        choices=[0, 1],
        default=None,
        help="NIXL prepared descriptor lists (make_prepped_xfer by block index)",
    )
    p.add_argument(
        "--nixl-parts",
        type=int,
        default=None,
        help="cut one transfer into this many NIXL WRITEs posted back to back (NixlTuning.parts)",
    )
    p.add_argument(
        "--claim",
        default="early",
        choices=["early", "late"],
        help="early: prepare() claims before the timed send (as prefill_worker does); "
        "late: send() claims (the round trip is in the latency)",
    )
    p.add_argument(
        "--block-runs",
        type=int,
        default=1,
        help="blocks come in runs of this many consecutive ids (1: scattered, 0: contiguous)",
    )
    p.add_argument("--ucx-net-devices", default="lo", help="UCX_NET_DEVICES for both processes")
    p.add_argument(
        "--no-thp",
        action="store_true",
        help="do not set THP_MEM_ALLOC_ENABLE=1 (CPU pools on 4 KiB pages: CMA ~2x slower)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = p.parse_args(argv)
    os.environ["UCX_NET_DEVICES"] = args.ucx_net_devices  # inherited by the spawned children
    if not args.no_thp:  # CPU pools on transparent huge pages: CMA pins 512x fewer pages
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO lines to stdout
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in report["results"]:
            print(_line(r))
        print(f"sink CPU while waiting on an open lease: {report['sink_idle_cpu_percent']:.1f}%")


if __name__ == "__main__":
    main()
