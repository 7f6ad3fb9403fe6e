"""Start a grpc.aio server, announce readiness, shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import grpc

from runtime.gc_pauses import GcPauses, freeze_startup_heap
from runtime.tls import TlsFiles

# Generous but bounded, both ways, on every server and channel: a prompt of 128K token ids is
# ~0.6 MB of varints. A bigger message is refused by gRPC itself with RESOURCE_EXHAUSTED
# before any handler sees it; an unparsable one gets UNKNOWN "Exception deserializing request!"
# (grpcio's answer, also before any handler; tests/integration/test_grpc_edge.py).
MAX_MESSAGE_BYTES = 64 << 20
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])


async def serve_until_signalled(
    server: grpc.aio.Server,
    host: str,
    port: int,
    worker_id: str,
    *,
    gc_pauses: GcPauses,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 5.0,
    tls: TlsFiles | None = None,
) -> None:
    """Bind host:port (port 0: any free port; TLS with `tls`), freeze the startup heap out of
    garbage collection and time the pauses left (runtime/gc_pauses.py), print `READY
    <worker_id> <host:port>` on stdout (launchers wait for that line) and serve until SIGTERM
    or SIGINT."""
    address = f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.server_credentials())
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    freeze_startup_heap()
    gc_pauses.install()
    print(f"READY {worker_id} {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"{worker_id}: stopping", file=sys.stderr, flush=True)
    await server.stop(grace_s)
    gc_pauses.uninstall()
    if on_stop is not None:
        await on_stop()
