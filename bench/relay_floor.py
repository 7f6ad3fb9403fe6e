"""The least CPU a Python relay spends per streamed token on this machine (the router's floor).

    python -m bench.relay_floor [--periods-ms 1,5,15,30,50] [--messages 128] \\
        [--load-threads 0|2] [--json]

What it measures. The router relays each token of a streamed response: a grpc.aio
server-streaming read returns one message, the router formats an SSE chunk and writes it to the
client's TCP socket. This program does only that, with none of the router's code: a uvloop loop,
a grpc.aio insecure channel read with `async for`, `b"data: " + msg + b"\\n\\n"` written with an
asyncio StreamWriter (write + drain) to a real loopback TCP connection. A peer subprocess owns
the grpc.aio server (one generic server-streaming method: `messages` raw 60-byte messages,
`period` apart on an absolute schedule) and the reader of that connection (an asyncio protocol
on the server's loop that drops what it reads). All of it binds and talks 127.0.0.1 only.

Why. When tokens come every 15-50 ms (a CPU decode worker), every token is a cold wakeup of the
router's loop thread: epoll returns, grpc's receive path runs, the coroutine resumes, the write
syscall goes out. A 64-token stream pays that 64 times, so "router overhead per request" cannot
go below 64 x this floor, whatever the router's code does.

How to read it (per period; "CPU" of the loop thread is its time.thread_time):
    segment CPU / wall   the read's return to the write's return (our own relay code only, ~0.5
                         us of clock reads inside it); a loopback TCP send usually also carries
                         the bytes through the receiving side's TCP stack (not a socketpair's)
    loop CPU / msg       the loop thread's CPU from the first message's read to the last one's
                         write, over messages - 1: each interval is one full relay, wakeup and
                         grpc's receive path included; this is the real floor per token
    proc CPU / msg       the same for the whole process: grpc's receive path also runs on its
                         own threads (the JSON's threads_cpu_per_message_us splits it by name:
                         "event_engine" is grpc core's pool, "python" the grpc.aio poller)
    x64 loop / x64 seg   64 x loop CPU / msg and 64 x mean segment CPU, in ms: the floor under
                         a 64-token stream's router overhead, and the part the relay code owns
    invol. cs / msg      involuntary context switches of the loop thread per message: > 0 means
                         other load preempted it (its wall then grows, its CPU should not)
--load-threads N runs a subprocess doing torch matmuls on N threads, ~5 ms compute then ~5 ms
sleep (like a CPU decode worker), during every measured stream. The startup heap is frozen out
of the GC (gc.freeze, as the router does). Timings are noisy on a shared box: the JSON carries
os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import uvloop

from bench.serve import nan_to_null, percentiles

METHOD = "/tandem.bench.Relay/Stream"
MESSAGE_BYTES = 60  # about one GenerateResponse with a token id, text and counters
STREAM_TOKENS = 64  # the stream length the floor is quoted for
_REQUEST = struct.Struct("<II")  # messages, period in microseconds
_WARMUP = (16, 1000)  # one short stream first: channel, call path and sink connection warm


def _exit_on_stdin_eof() -> None:
    """A child exits when its parent's end of its stdin closes (the parent died or stopped it)."""

    def wait() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=wait, daemon=True).start()


# ---- the peer subprocess: grpc.aio server + TCP sink, one uvloop loop --------------------------


class _Drain(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def _stream(request: bytes, context: Any) -> Any:
    messages, period_us = _REQUEST.unpack(request)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(messages):
        # absolute schedule: a late wakeup does not push the later messages back
        await asyncio.sleep(max(0.0, start + (i + 1) * period_us / 1e6 - loop.time()))
        yield f"{i:08d}".encode().ljust(MESSAGE_BYTES, b"x")


async def _peer() -> None:
    service, method = METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_stream_rpc_method_handler(_stream)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sink = await asyncio.get_running_loop().create_server(_Drain, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    print(f"READY {grpc_port} {sink_port}", flush=True)
    await server.wait_for_termination()


def peer_main() -> None:
    """Entry point of the peer subprocess (stdout: `READY <grpc port> <sink port>`)."""
    _exit_on_stdin_eof()
    uvloop.run(_peer())


# ---- the load subprocess: a CPU decode worker's duty cycle -----------------------------------


def load_main(threads: int, compute_ms: float = 5.0, sleep_ms: float = 5.0) -> None:
    """Entry point of the load subprocess: matmuls on `threads` threads for ~compute_ms, then
    sleep_ms, forever (stdout: `READY` once warm)."""
    import torch

    _exit_on_stdin_eof()
    torch.set_num_threads(threads)
    a = torch.randn(384, 384)
    b = torch.randn(384, 384)
    torch.mm(a, b)
    print("READY", flush=True)
    while True:
        end = time.perf_counter() + compute_ms / 1e3
        while time.perf_counter() < end:
            torch.mm(a, b)
        time.sleep(sleep_ms / 1e3)


# ---- the measured process ----------------------------------------------------------------------


def _start(entry: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Start a child running this module's `entry` (a call, e.g. "peer_main()") and wait for its
    READY line; returns the child and the line's fields."""
    code = f"import bench.relay_floor as m; m.{entry}"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        _stop(proc)
        raise RuntimeError(f"child {entry} exited before READY (rc {proc.returncode})")
    return proc, line.split()[1:]


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop one child by its PID: SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@dataclass(frozen=True, slots=True)
class _Mark:
    """The measured process's clocks at one instant."""

    loop_cpu_s: float  # this (the loop) thread's CPU, time.thread_time
    process_cpu_s: float  # the whole process's CPU, time.process_time
    usage: resource.struct_rusage  # this thread's getrusage (context switches)
    others_ns: dict[str, int]  # every other thread's run time, summed by thread name


def _others_ns() -> dict[str, int]:
    """Run time (ns, /proc/self/task/*/schedstat) of the process's other threads, by name: the
    grpc.aio poller is a Python thread ("python"), grpc core's pool "event_engine"."""
    own = str(threading.get_native_id())
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        if tid == own:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                ran_ns = int(f.read().split()[0])
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        out[name] = out.get(name, 0) + ran_ns
    return out


def _mark_start() -> _Mark:
    others = _others_ns()  # read before the clocks: the reads stay out of the interval
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return _Mark(time.thread_time(), time.process_time(), usage, others)


def _mark_end() -> _Mark:
    loop_cpu_s, process_cpu_s = time.thread_time(), time.process_time()
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return _Mark(loop_cpu_s, process_cpu_s, usage, _others_ns())


async def _relay(
    channel: grpc.aio.Channel, sink_port: int, messages: int, period_us: int
) -> dict[str, Any]:
    """One stream relayed message by message; raw per-message samples and per-message totals."""
    _, writer = await asyncio.open_connection("127.0.0.1", sink_port)
    seg_cpu = [0.0] * messages
    seg_wall = [0.0] * messages
    marks: list[_Mark] = []
    call = channel.unary_stream(METHOD)(_REQUEST.pack(messages, period_us))
    i = 0
    async for msg in call:
        if i == 0:  # the start mark, outside the first segment
            marks.append(_mark_start())
        c0, w0 = time.thread_time(), time.perf_counter()
        writer.write(b"data: " + msg + b"\n\n")
        await writer.drain()  # never yields unless the sink pushes back
        c1, w1 = time.thread_time(), time.perf_counter()
        seg_cpu[i], seg_wall[i] = c1 - c0, w1 - w0
        i += 1
        if i == messages:  # the end mark, before the call's trailers are read
            marks.append(_mark_end())
    writer.close()
    await writer.wait_closed()
    if i != messages:
        raise RuntimeError(f"stream gave {i} of {messages} messages")
    first, last = marks
    n = messages - 1  # intervals between the marks: each is one whole relay
    loop_cpu = (last.loop_cpu_s - first.loop_cpu_s) / n
    others = {k: (v - first.others_ns.get(k, 0)) / 1e9 / n for k, v in last.others_ns.items()}
    return {
        "seg_cpu": seg_cpu,
        "seg_wall": seg_wall,
        "loop_cpu": loop_cpu,
        "proc_cpu": (last.process_cpu_s - first.process_cpu_s) / n,
        "threads_cpu": {"loop": loop_cpu, **others},
        "nivcsw": (last.usage.ru_nivcsw - first.usage.ru_nivcsw) / n,
        "nvcsw": (last.usage.ru_nvcsw - first.usage.ru_nvcsw) / n,
    }


def _row(period_ms: float, messages: int, raw: dict[str, Any]) -> dict[str, Any]:
    us = 1e6
    cpu = percentiles([v * us for v in raw["seg_cpu"]])
    wall = percentiles([v * us for v in raw["seg_wall"]])
    return {
        "period_ms": period_ms,
        "messages": messages,
        "segment_cpu_us": cpu,
        "segment_wall_us": {k: wall[k] for k in ("mean", "p50", "p99")},
        "loop_cpu_per_message_us": raw["loop_cpu"] * us,
        "process_cpu_per_message_us": raw["proc_cpu"] * us,
        "threads_cpu_per_message_us": {k: v * us for k, v in raw["threads_cpu"].items()},
        "involuntary_switches_per_message": raw["nivcsw"],
        "voluntary_switches_per_message": raw["nvcsw"],
        f"stream{STREAM_TOKENS}_loop_cpu_ms": STREAM_TOKENS * raw["loop_cpu"] * 1e3,
        f"stream{STREAM_TOKENS}_segment_cpu_ms": STREAM_TOKENS * cpu["mean"] / 1e3,
    }


async def _measure(
    grpc_port: int, sink_port: int, periods_ms: list[float], messages: int
) -> list[dict[str, Any]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        await _relay(channel, sink_port, *_WARMUP)
        gc.collect()
        gc.freeze()  # as the router does after startup: the GC's full walks skip what is alive
        rows = []
        for period_ms in periods_ms:
            raw = await _relay(channel, sink_port, messages, round(period_ms * 1000))
            rows.append(_row(period_ms, messages, raw))
        return rows
    finally:
        await channel.close(grace=None)


def run(periods_ms: list[float], messages: int, load_threads: int) -> dict[str, Any]:
    if messages < 2:
        raise ValueError("--messages must be >= 2 (per-message CPU is taken between messages)")
    loadavg_before = os.getloadavg()
    children: list[subprocess.Popen[str]] = []
    try:
        peer, (grpc_port, sink_port) = _start("peer_main()")
        children.append(peer)
        if load_threads:
            load, _ = _start(f"load_main({load_threads})")
            children.append(load)
        rows = uvloop.run(_measure(int(grpc_port), int(sink_port), periods_ms, messages))
    finally:
        for child in reversed(children):
            _stop(child)
    return {
        "config": {
            "periods_ms": periods_ms,
            "messages": messages,
            "load_threads": load_threads,
            "message_bytes": MESSAGE_BYTES,
            "stream_tokens": STREAM_TOKENS,
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "uvloop": importlib.metadata.version("uvloop"),
            "cpu_count": os.cpu_count(),
            "loadavg_before": list(loadavg_before),
            "loadavg_after": list(os.getloadavg()),
        },
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    c, m = report["config"], report["machine"]
    n = c["stream_tokens"]
    lines = [
        f"relay floor: {c['messages']} msgs/stream, load threads {c['load_threads']}, "
        f"{m['cpu_count']} CPUs, load avg {m['loadavg_before'][0]:.2f} -> "
        f"{m['loadavg_after'][0]:.2f}",
        f"{'period':>7}{'seg CPU us':>24}{'seg wall us':>16}{'loop CPU':>10}{'proc CPU':>10}"
        f"{'invol.cs':>10}{f'x{n} loop':>10}{f'x{n} seg':>9}",
        f"{'(ms)':>7}{'p50':>8}{'p90':>8}{'p99':>8}{'p50':>8}{'p99':>8}{'us/msg':>10}"
        f"{'us/msg':>10}{'/msg':>10}{'(ms)':>10}{'(ms)':>9}",
    ]
    for r in report["results"]:
        cpu, wall = r["segment_cpu_us"], r["segment_wall_us"]
        lines.append(
            f"{r['period_ms']:>7g}{cpu['p50']:>8.1f}{cpu['p90']:>8.1f}{cpu['p99']:>8.1f}"
            f"{wall['p50']:>8.1f}{wall['p99']:>8.1f}{r['loop_cpu_per_message_us']:>10.1f}"
            f"{r['process_cpu_per_message_us']:>10.1f}"
            f"{r['involuntary_switches_per_message']:>10.2f}"
            f"{r[f'stream{n}_loop_cpu_ms']:>10.2f}{r[f'stream{n}_segment_cpu_ms']:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.relay_floor", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "--periods-ms", default="1,5,15,30,50", help="comma-separated spacings between messages"
    )
    p.add_argument("--messages", type=int, default=128, help="messages per stream (>= 2)")
    p.add_argument(
        "--load-threads", type=int, default=0, help="torch threads of a CPU-decode-like load"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = p.parse_args(argv)
    periods_ms = [float(x) for x in args.periods_ms.split(",")]
    report = run(periods_ms, args.messages, args.load_threads)
    print(json.dumps(nan_to_null(report), indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
