"""Start a grpc.aio server, announce readiness, shut down gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import grpc

# Generous but bounded: prompts of 128K token ids are ~0.6 MB of varints.
MAX_MESSAGE_BYTES = 64 << 20


def new_server() -> grpc.aio.Server:
    return grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )


async def serve_until_signalled(
    server: grpc.aio.Server,
    host: str,
    port: int,
    worker_id: str,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 5.0,
) -> None:
    """Bind host:port (port 0: any free port), print `READY <worker_id> <host:port>` on stdout
    (launchers wait for that line) and serve until SIGTERM or SIGINT."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    print(f"READY {worker_id} {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"{worker_id}: stopping", file=sys.stderr, flush=True)
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()
