"""Handles, runs, framing and the backend registry: everything short of a second process."""

from __future__ import annotations

import socket
import struct
import sys
import time

import msgpack
import pytest

from engine.kv_layout import KVLayout, block_runs
from kv_transfer import registry
from kv_transfer.base import BackendUnavailable, KVHandle, KVLayoutMismatch, check_layouts
from kv_transfer.transport import paired_runs
from kv_transfer.wire import (
    Connection,
    ConnectionClosed,
    layout_from_wire,
    layout_to_wire,
    listen,
)

HANDLE = KVHandle("req-1", "kv-sink-1", (5, 6, 9), 42, "abcd", "127.0.0.1:5555")


def test_handle_round_trips_through_plain_msgpack() -> None:
    wire = msgpack.packb(HANDLE.to_wire(), use_bin_type=True)
    assert KVHandle.from_wire(msgpack.unpackb(wire, raw=False)) == HANDLE


def test_a_tp_handle_joins_one_lease_per_sink_rank() -> None:
    rank1 = KVHandle("req-1", "kv-sink-1-tp1", (5, 6, 9), 7, "ef01", "127.0.0.1:5556")
    joined = KVHandle.of_ranks([HANDLE, rank1])
    assert joined.sink_tp == 2 and joined.rank(0) == HANDLE and joined.rank(1) == rank1
    wire = msgpack.packb(joined.to_wire(), use_bin_type=True)
    assert KVHandle.from_wire(msgpack.unpackb(wire, raw=False)) == joined
    with pytest.raises(ValueError, match="different transfers"):
        KVHandle.of_ranks([HANDLE, KVHandle("req-2", "s", (5, 6, 9), 1, "x", "a:1")])
    with pytest.raises(ValueError, match="sink rank 2"):
        joined.rank(2)


@pytest.mark.parametrize(
    "broken",
    [{}, {**HANDLE.to_wire(), "generation": "42"}, {**HANDLE.to_wire(), "more_ranks": [[1]]}],
)
def test_malformed_handle_is_a_value_error(broken: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not a KVHandle"):
        KVHandle.from_wire(broken)


def test_paired_runs_coalesce_only_where_both_sides_are_consecutive() -> None:
    assert paired_runs([7, 8, 9, 3, 4], [20, 21, 40, 41, 42]) == [
        (7, 20, 2),
        (9, 40, 1),
        (3, 41, 2),
    ]
    dst = [3, 4, 5, 9, 10, 2]
    assert [(d, n) for _, d, n in paired_runs(list(range(6)), dst)] == block_runs(dst)
    with pytest.raises(ValueError):
        paired_runs([1, 2], [1])


def test_layout_check_names_every_differing_field() -> None:
    a = KVLayout("m", "bfloat16", 64, 16, 32, 8, 128)
    b = KVLayout("m", "float32", 128, 16, 30, 8, 128)  # num_blocks may differ
    with pytest.raises(KVLayoutMismatch) as e:
        check_layouts(a, b)
    assert e.value.differences == ("dtype: 'bfloat16' != 'float32'", "num_layers: 32 != 30")
    assert layout_from_wire(msgpack.unpackb(msgpack.packb(layout_to_wire(a)))) == a


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    server = listen("127.0.0.1", 0)
    right = socket.create_connection(server.getsockname())
    server.setblocking(True)
    left, _ = server.accept()
    server.close()
    return left, right


def test_frames_split_across_reads_and_refusal_before_eof() -> None:
    left, right = tcp_pair()
    conn = Connection(left)
    body = msgpack.packb({"op": "refuse", "reason": "x"})
    frame = struct.pack("!I", len(body)) + body
    right.sendall(frame[:3])
    assert conn.receive() == []
    right.sendall(frame[3:] + frame)
    right.close()
    time.sleep(0.05)
    assert [m["op"] for m in conn.receive()] == ["refuse", "refuse"]  # delivered, then EOF
    with pytest.raises(ConnectionClosed):
        conn.receive()
    conn.close()


@pytest.mark.parametrize("garbage", [struct.pack("!I", 1 << 30), struct.pack("!I", 1) + b"\xc1"])
def test_garbage_frames_close_the_connection(garbage: bytes) -> None:
    left, right = tcp_pair()
    conn = Connection(left)
    right.sendall(garbage)
    time.sleep(0.05)
    with pytest.raises(ConnectionClosed):
        conn.receive()
    conn.close()
    right.close()


def test_registry_names_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.names() == ["nixl", "ucx"]
    with pytest.raises(ValueError, match="unknown KV transfer backend 'rdma'"):
        registry.make_sink("rdma", None)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "ucxx", None)  # as if ucxx were not installed
    monkeypatch.delitem(sys.modules, "kv_transfer.ucx", raising=False)
    with pytest.raises(BackendUnavailable, match=r"pip install -e '\.\[kv\]'"):
        registry.make_source("ucx", None)  # type: ignore[arg-type]
