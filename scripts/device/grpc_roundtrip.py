"""What one hop of the disagg critical path costs gRPC, without engines, NIXL or other threads:
a server in a child process that only reads, and a client on loopback, p50 of N round trips.

- `prefill session`: a remote prefill as the decode worker sends it now, through the real
  session code on both sides (decode_worker/prefill_session.py, prefill_worker/session.py) over
  one PrefillSession stream opened once: the 3,000-id PrefillRequest, then its destination,
  the reply; also the prefill-side request's own time, so that their difference is gRPC's (and
  the multiplexing's) part of it; and `first token`: request sent -> the first-token message
  back (the prefill side announces it at once: no compute), gRPC's part of the `first_token`
  step, the one on the time to first token;
- `unary`: the same 3,000-id request as one unary call (the shape before 6c713f3);
- `persistent stream`: the request and a 200-byte destination written on a bidirectional stream
  opened once, one reply read per message (the raw floor of the session above).

    python3 scripts/device/grpc_roundtrip.py [N]     # from the repository root
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

import grpc

from decode_worker.prefill_session import PrefillSessions
from prefill_worker.session import PrefillSession
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg


class _Prefiller:
    """The prefill side's per-request work, none: the first token at once, the reply once the
    destination arrived."""

    def destination(self, msg: pb.KVDestination) -> pb.KVDestination:
        return msg

    async def prefill(
        self,
        request: pb.PrefillRequest,
        destination: asyncio.Future[pb.KVDestination],
        announce: Callable[[pb.PrefillFirstToken], None],
    ) -> pb.PrefillResponse:
        start = time.monotonic()
        announce(pb.PrefillFirstToken(request_id=request.request_id, token_id=1))
        await destination
        return pb.PrefillResponse(request_id=request.request_id, prefill_s=time.monotonic() - start)


class _Servicer(pbg.PrefillWorkerServicer):
    async def PrefillSession(
        self, up: AsyncIterable[pb.PrefillUp], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PrefillDown]:
        async for down in PrefillSession(_Prefiller()).run(up):
            yield down


async def _echo_stream(
    messages: AsyncIterable[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for _ in messages:
        yield b"r"


async def _unary(message: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"r"


async def _serve(ports: mp.Queue) -> None:  # type: ignore[type-arg]
    server = grpc.aio.server()
    pbg.add_PrefillWorkerServicer_to_server(_Servicer(), server)
    generic = grpc.method_handlers_generic_handler(
        "bench.Hop",
        {
            "Stream": grpc.stream_stream_rpc_method_handler(_echo_stream),
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        },
    )
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports.put(port)
    await server.wait_for_termination()


def _server_main(ports: mp.Queue) -> None:  # type: ignore[type-arg]
    asyncio.run(_serve(ports))


def _p50_ms(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2] * 1e3


async def _client(port: int, n: int) -> dict[str, float]:
    prompt = list(range(1000, 4000))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        sessions = PrefillSessions()
        session = sessions.session(f"127.0.0.1:{port}", "bench")
        call_s, handler_s, first_s = [], [], []
        for i in range(n):
            start = time.monotonic()
            prefill = session.open(str(i), 30.0)
            request = pb.PrefillRequest(request_id=str(i), prompt_token_ids=prompt)
            await prefill.send(pb.PrefillUp(request=request))
            await prefill.first()
            first_s.append(time.monotonic() - start)
            destination = pb.PrefillDestination(
                request_id=str(i), destination=pb.KVDestination(first_kv_block=0)
            )
            await prefill.send(pb.PrefillUp(destination=destination))
            reply = await prefill.reply()
            prefill.close()
            call_s.append(time.monotonic() - start)
            handler_s.append(reply.prefill_s)
        await sessions.close()
        payload = pb.PrefillRequest(request_id="x", prompt_token_ids=prompt).SerializeToString()
        unary = channel.unary_unary("/bench.Hop/Unary")
        unary_s = []
        for _ in range(n):
            start = time.monotonic()
            await unary(payload)
            unary_s.append(time.monotonic() - start)
        stream = channel.stream_stream("/bench.Hop/Stream")()
        stream_s = []
        for _ in range(n):
            start = time.monotonic()
            await stream.write(payload)
            await stream.write(b"d" * 200)
            await stream.read()
            await stream.read()
            stream_s.append(time.monotonic() - start)
        await stream.done_writing()
    return {
        "prefill session": _p50_ms(call_s),
        "first token": _p50_ms(first_s),
        "prefill session, server request": _p50_ms(handler_s),
        "unary": _p50_ms(unary_s),
        "persistent stream": _p50_ms(stream_s),
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    ports: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    child = mp.Process(target=_server_main, args=(ports,), daemon=True)
    child.start()
    try:
        p50 = asyncio.run(_client(ports.get(timeout=30), n))
    finally:
        child.terminate()
        child.join()
    gap = p50["prefill session"] - p50["prefill session, server request"]
    print(f"{n} round trips each, p50 ms: " + ", ".join(f"{k} {v:.3f}" for k, v in p50.items()))
    print(f"gRPC's part of a remote prefill on the session: {gap:.3f} ms")


if __name__ == "__main__":
    main()
