"""The Prefill call's own cost: a client-streaming call shaped like the decode worker's (a
3,000-id PrefillRequest, then a KVDestination, half-close, the reply) against a server in a
child process that only reads the two messages, over loopback. Prints the client's round
trip and the server handler's time (p50 of N calls, ms): their difference is gRPC's part of
the decode worker's prefill_rpc step, without engines, NIXL or other threads.

    python3 scripts/device/grpc_roundtrip.py [N]     # from the repository root
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from collections.abc import AsyncIterable

import grpc

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg


class _Servicer(pbg.PrefillWorkerServicer):
    async def Prefill(
        self, messages: AsyncIterable[pb.PrefillMessage], context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        start = time.monotonic()
        async for _ in messages:
            pass
        return pb.PrefillResponse(
            request_id="x", first_token_id=1, prefill_s=time.monotonic() - start
        )


async def _serve(ports: mp.Queue) -> None:  # type: ignore[type-arg]
    server = grpc.aio.server()
    pbg.add_PrefillWorkerServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await server.wait_for_termination()


def _server_main(ports: mp.Queue) -> None:  # type: ignore[type-arg]
    asyncio.run(_serve(ports))


async def _client(port: int, n: int) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pbg.PrefillWorkerStub(channel)
        prompt = list(range(1000, 4000))
        round_trips, handler = [], []
        for i in range(n):
            start = time.monotonic()
            call = stub.Prefill(timeout=30)
            request = pb.PrefillRequest(request_id=str(i), prompt_token_ids=prompt)
            await call.write(pb.PrefillMessage(request=request))
            await call.write(pb.PrefillMessage(destination=pb.KVDestination(first_kv_block=0)))
            await call.done_writing()
            reply = await call
            round_trips.append(time.monotonic() - start)
            handler.append(reply.prefill_s)
    return sorted(round_trips)[n // 2], sorted(handler)[n // 2]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    ports: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    child = mp.Process(target=_server_main, args=(ports,), daemon=True)
    child.start()
    try:
        rt, handler = asyncio.run(_client(ports.get(timeout=30), n))
    finally:
        child.terminate()
        child.join()
    print(
        f"Prefill call shape, {n} calls: round trip p50 {rt * 1e3:.3f} ms, server handler p50 "
        f"{handler * 1e3:.3f} ms, gRPC's part {(rt - handler) * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()
