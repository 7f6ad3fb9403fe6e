"""The control channel: msgpack maps framed by a 4-byte big-endian length, over TCP.

Why our own socket and not NIXL's listener thread: the channel carries more than agent metadata
(layout descriptor, claims, grants, aborts and their acks), it must work for the ucx backend too,
and a dropped TCP connection is how each side learns that the other process died. NIXL's
listener only exchanges metadata, polls on its own thread and would need a port per agent anyway.

Messages (field "op"; all other fields plain msgpack types, never pickle):

    source -> sink   hello   {v, backend, agent, layout, transport}   once, first
    sink -> source   welcome {agent, layout, transport} | refuse {kind, reason, differences}
    source -> sink   claim   {tid, gen}              may I write transfer tid of generation gen?
    sink -> source   grant   {tid, gen} | deny {tid, gen, reason}
    source -> sink   write   {tid, gen}              posting the write now (the sink may sleep
                                                     between grant and write; a hint, not a fence)
    sink -> source   abort   {tid, gen, reason}      stop; ack once nothing more can be written
    source -> sink   ack     {tid, gen}              no write of (tid, gen) is or will be in flight
    source -> sink   failed  {tid, gen, reason}      my write failed and is over (implies ack)
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import asdict
from typing import Any

import msgpack

from engine.kv_layout import KVLayout
from kv_transfer.base import HandshakeFailed

PROTOCOL_VERSION = 2  # 2: claims carry no segments (early claims), `write`
MAX_FRAME_BYTES = 16 << 20  # a claim for a 1M-token prompt is a few hundred KiB
_HEADER = struct.Struct("!I")
_RECV_CHUNK = 1 << 16

Message = dict[str, Any]


class ConnectionClosed(Exception):
    """The peer closed the connection, it broke, or it sent a malformed frame."""


class Connection:
    """One non-blocking framed connection. receive() returns whole messages; send() queues and
    writes what the socket takes, flush() writes the rest (call it when select says writable)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._rbuf = bytearray()
        self._wbuf = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def wants_write(self) -> bool:
        return bool(self._wbuf)

    def send(self, msg: Message) -> None:
        body = msgpack.packb(msg, use_bin_type=True)
        self._wbuf += _HEADER.pack(len(body)) + body
        self.flush()

    def flush(self) -> None:
        while self._wbuf:
            try:
                n = self.sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                raise ConnectionClosed(f"send failed: {e}") from e
            del self._wbuf[:n]

    def receive(self) -> list[Message]:
        """Messages that arrived so far (maybe none). Raises ConnectionClosed at EOF, once the
        messages sent before it (a refusal, say) have been returned."""
        closed: str | None = None
        while True:
            try:
                chunk = self.sock.recv(_RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                closed = f"recv failed: {e}"
                break
            if not chunk:
                closed = "closed by peer"
                break
            self._rbuf += chunk
        messages = self._parse()
        if closed is not None and not messages:
            raise ConnectionClosed(closed)
        return messages

    def _parse(self) -> list[Message]:
        out: list[Message] = []
        while len(self._rbuf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._rbuf)
            if size > MAX_FRAME_BYTES:
                raise ConnectionClosed(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
            end = _HEADER.size + size
            if len(self._rbuf) < end:
                break
            try:
                msg = msgpack.unpackb(bytes(self._rbuf[_HEADER.size : end]), raw=False)
            except (ValueError, msgpack.UnpackException) as e:
                raise ConnectionClosed(f"undecodable frame: {e}") from e
            del self._rbuf[:end]
            if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
                raise ConnectionClosed(f"not a control message: {msg!r:.200}")
            out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


def listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket; port 0 picks a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def connect(address: str, timeout_s: float) -> Connection:
    """Blocking TCP connect (bounded by timeout_s), then a non-blocking Connection."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as e:
        refused = e.errno == errno.ECONNREFUSED
        raise HandshakeFailed(
            f"cannot reach sink at {address}: {'nothing listens there' if refused else e}"
        ) from e
    return Connection(sock)


def layout_to_wire(layout: KVLayout) -> dict[str, Any]:
    return asdict(layout)


def layout_from_wire(fields: object) -> KVLayout:
    try:
        if not isinstance(fields, dict):
            raise TypeError(type(fields).__name__)
        return KVLayout(**fields)
    except TypeError as e:
        raise HandshakeFailed(f"peer sent a malformed layout descriptor: {fields!r}") from e


def require(msg: Message, name: str, kind: type | tuple[type, ...]) -> Any:
    """msg[name], checked to be of `kind`; a bad message is a broken peer."""
    value = msg.get(name)
    if not isinstance(value, kind):
        raise ConnectionClosed(f"{msg.get('op')!r} message without a valid {name!r}: {msg!r:.200}")
    return value
