"""KV transfer between two real processes on CPU, for each backend (issue 3, acceptance 1).

Each test ends with Pair.audit(): on both sides every reserved or sent block ended exactly once
(landed or released) and nothing is left open.
"""

from __future__ import annotations

import time

import pytest

from tests.kv_transfer.conftest import LAYOUT, Pair
from tests.kv_transfer.peer import Peer, Reply, count


def kinds(events: list[Reply]) -> list[str]:
    return [e["kind"] for e in events]


def settle(peer: Peer, seconds: float) -> list[Reply]:
    """Every event the peer reports within `seconds` (for asserting that none comes)."""
    deadline, events = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        events += peer.call("events")["events"]
        time.sleep(0.02)
    return events


def test_scattered_blocks_land_byte_for_byte(pair: Pair) -> None:
    plan = pair.plan([40, 7], scatter=True) + pair.plan([24], scatter=False)
    pair.send(plan)
    landed = pair.sink.wait_events(lambda ev: count(ev, "KVLanded") == 3)
    done = pair.source.wait_events(lambda ev: count(ev, "SendDone") == 3)
    assert kinds(landed) == ["KVLanded"] * 3 and kinds(done) == ["SendDone"] * 3
    by_tid = {e["tid"]: e for e in landed}
    for p in plan:
        assert by_tid[p["tid"]]["block_ids"] == p["dst"]
        assert pair.same_bytes(p), p["tid"]
    pair.audit()


def test_64_concurrent_transfers_interleave(pair: Pair) -> None:
    plan = pair.plan([1 + i % 4 for i in range(64)], scatter=True)  # 160 of 256 blocks
    pair.send(plan)  # 64 claims in flight at once; grants and writes interleave
    landed = pair.sink.wait_events(lambda ev: count(ev, "KVLanded") == 64)
    pair.source.wait_events(lambda ev: count(ev, "SendDone") == 64)
    assert sorted(e["tid"] for e in landed) == sorted(p["tid"] for p in plan)
    assert all(pair.same_bytes(p) for p in plan)
    pair.audit()


def test_claimed_before_compute_then_sent_lands(pair: Pair) -> None:
    """prepare() claims when prefill starts; send() after compute posts with no round trip."""
    plan = pair.plan([9, 3], scatter=True)
    pair.source.call("prepare", handles=[p["handle"] for p in plan])
    settle(pair.sink, 0.1)  # grants are in before the blocks are ready
    assert kinds(settle(pair.source, 0.05)) == []  # a prepare alone reports nothing
    pair.send(plan)
    landed = pair.sink.wait_events(lambda ev: count(ev, "KVLanded") == 2)
    pair.source.wait_events(lambda ev: count(ev, "SendDone") == 2)
    assert sorted(e["tid"] for e in landed) == sorted(p["tid"] for p in plan)
    assert all(pair.same_bytes(p) for p in plan)
    pair.audit()


def test_claimed_early_lease_expires_before_the_send(pair: Pair) -> None:
    """The grant does not outlive the lease: a send after expiry is refused, no byte lands."""
    [p] = pair.plan([8], lease_s=0.4)
    pair.source.call("prepare", handles=[p["handle"]])
    events = pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1, timeout_s=5)
    assert kinds(events) == ["KVLost", "KVReleased"]
    assert {e["reason"] for e in events} == {"expired"}
    other = pair.sink.call("expect", tid="other", block_ids=p["dst"], lease_s=30)["handle"]
    assert other["generation"] > p["handle"]["generation"]
    pair.sink.call("fill", block_ids=p["dst"], seed=998)
    before = pair.sink.call("digest", block_ids=p["dst"])["digests"]
    pair.send([p])
    [failed] = pair.source.wait_events(lambda ev: len(ev) == 1)
    assert failed["kind"] == "SendFailed" and failed["error"] == "TransferAborted"
    assert "KVLanded" not in kinds(settle(pair.sink, 0.2))
    assert pair.sink.call("digest", block_ids=p["dst"])["digests"] == before
    pair.sink.call("abort", tid="other")
    pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1)
    pair.audit()


def test_claimed_early_then_cancelled_frees_the_sink(pair: Pair) -> None:
    """Prefill failed after the claim: cancel() tells the sink, which frees the blocks."""
    [p] = pair.plan([5])
    pair.source.call("prepare", handles=[p["handle"]])
    settle(pair.sink, 0.1)
    pair.source.call("cancel", handle=p["handle"])
    events = pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1, timeout_s=5)
    assert kinds(events) == ["KVLost", "KVReleased"]
    assert {e["reason"] for e in events} == {"failed"}
    assert kinds(settle(pair.source, 0.05)) == []
    pair._planned = [b for b in pair._planned if b not in p["src"]]
    pair.audit()


def test_unwritten_lease_expires_and_a_late_send_is_refused(pair: Pair) -> None:
    [late] = pair.plan([8], lease_s=0.3)
    t0 = time.monotonic()
    events = pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1, timeout_s=5)
    assert time.monotonic() - t0 >= 0.25
    assert kinds(events) == ["KVLost", "KVReleased"]
    assert {e["reason"] for e in events} == {"expired"}
    # The freed blocks go to another request, which writes its own KV into them.
    other = pair.sink.call("expect", tid="other", block_ids=late["dst"], lease_s=30)["handle"]
    assert other["generation"] > late["handle"]["generation"]
    pair.sink.call("fill", block_ids=late["dst"], seed=999)
    before = pair.sink.call("digest", block_ids=late["dst"])["digests"]
    pair.send([late])  # the prefill side shows up after the lease: refused before any write
    [failed] = pair.source.wait_events(lambda ev: len(ev) == 1)
    assert failed["kind"] == "SendFailed" and failed["error"] == "TransferAborted"
    assert "expired" in failed["message"] or "unknown generation" in failed["message"]
    assert pair.sink.call("digest", block_ids=late["dst"])["digests"] == before
    pair.sink.call("abort", tid="other")
    pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1)
    pair.audit()


@pytest.mark.parametrize("cause", ["abort", "lease"])
def test_transfer_lost_while_its_write_is_in_flight(pair: Pair, cause: str) -> None:
    """The source holds a grant and its write is in flight (held by the gate) when the sink
    gives the transfer up. The blocks must not be reused while that write can still land."""
    pair.source.call("gate", open=False)
    [p] = pair.plan([12], lease_s=30.0 if cause == "abort" else 0.5)
    pair.send([p])
    deadline = time.monotonic() + 10
    while pair.source.call("held")["held"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    if cause == "abort":
        pair.sink.call("abort", tid=p["tid"])
    lost = pair.sink.wait_events(lambda ev: count(ev, "KVLost") == 1, timeout_s=5)
    reason = "aborted" if cause == "abort" else "expired"
    assert lost[0]["kind"] == "KVLost" and lost[0]["reason"] == reason
    if pair.one_sided:
        # NIXL: only the source can stop its WRITE; the blocks stay quarantined until it acks.
        quiet = lost[1:] + settle(pair.sink, 0.4)
        assert "KVReleased" not in kinds(quiet)
        pair.source.call("gate", open=True)  # the late write lands, in quarantined blocks
        released = pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1)
        pair.sink.call("expect", tid="next", block_ids=p["dst"], lease_s=30)
        pair.sink.call("fill", block_ids=p["dst"], seed=7)
        marker = pair.sink.call("digest", block_ids=p["dst"])["digests"]
    else:
        # ucx: the sink receives nothing for a fenced transfer, so it frees the blocks at once;
        # the next request writes them, then the late data arrives and goes to scratch.
        released = lost[1:] or pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1)
        pair.sink.call("expect", tid="next", block_ids=p["dst"], lease_s=30)
        pair.sink.call("fill", block_ids=p["dst"], seed=7)
        marker = pair.sink.call("digest", block_ids=p["dst"])["digests"]
        pair.source.call("gate", open=True)
    assert [e["reason"] for e in released if e["kind"] == "KVReleased"] == [reason]
    [failed] = pair.source.wait_events(lambda ev: len(ev) == 1)
    assert failed["kind"] == "SendFailed" and failed["error"] == "TransferAborted"
    assert "KVLanded" not in kinds(settle(pair.sink, 0.2))
    assert pair.sink.call("digest", block_ids=p["dst"])["digests"] == marker
    pair.sink.call("abort", tid="next")
    pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 1)
    pair.audit()


def test_layout_mismatch_is_refused_naming_the_fields(pair: Pair) -> None:
    [p] = pair.plan([4])
    result = pair.source.call(
        "mismatched",
        sink_address=pair.sink.info["address"],
        handle=p["handle"],
        dtype="bfloat16",
        num_layers=8,
    )
    connect = result["connect"]
    assert connect["error"] == "KVLayoutMismatch"
    assert "dtype: 'float32' != 'bfloat16'" in connect["message"]
    assert "num_layers: 4 != 8" in connect["message"]
    assert "block_size" not in connect["message"]
    [failed] = result["events"]
    assert failed["kind"] == "SendFailed" and failed["error"] == "KVLayoutMismatch"
    # Refused before any claim: the sink is unharmed and the handle still works.
    pair.send([p])
    pair.sink.wait_events(lambda ev: count(ev, "KVLanded") == 1)
    pair.source.wait_events(lambda ev: count(ev, "SendDone") == 1)
    assert pair.same_bytes(p)
    pair.audit()


def test_source_killed_mid_transfer(pair: Pair) -> None:
    pair.source.call("gate", open=False)
    *in_flight, unclaimed = pair.plan([6, 6, 6, 6, 5])
    pair.send(in_flight)
    deadline = time.monotonic() + 10
    while pair.source.call("held")["held"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    pair.source.kill()
    events = pair.sink.wait_events(lambda ev: count(ev, "KVReleased") == 4, timeout_s=10)
    assert sorted(kinds(events)) == ["KVLost"] * 4 + ["KVReleased"] * 4
    assert {e["reason"] for e in events} == {"peer_lost"}
    assert pair.sink.call("account")["open"] == [unclaimed["tid"]]  # not claimed: still valid
    # A new prefill process picks the unclaimed handle up.
    pair.respawn("source")
    pair.source.call("fill", block_ids=unclaimed["src"], seed=5)
    pair.send([unclaimed])
    pair.sink.wait_events(lambda ev: count(ev, "KVLanded") == 1)
    pair.source.wait_events(lambda ev: count(ev, "SendDone") == 1)
    assert pair.same_bytes(unclaimed)
    pair.audit()


def test_sink_killed_mid_transfer(pair: Pair) -> None:
    pair.source.call("gate", open=False)
    plan = pair.plan([6, 6, 6, 6])
    pair.send(plan)
    deadline = time.monotonic() + 10
    while pair.source.call("held")["held"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    pair.sink.kill()
    failed = pair.source.wait_events(lambda ev: count(ev, "SendFailed") == 4, timeout_s=10)
    assert {e["error"] for e in failed} == {"PeerLost"}
    assert pair.source.call("account")["open"] == []
    # The source is healthy: it serves a new decode process.
    pair.respawn("sink")
    pair.source.call("gate", open=True)
    [p] = pair.plan([9])
    pair.send([p])
    pair.sink.wait_events(lambda ev: count(ev, "KVLanded") == 1)
    pair.source.wait_events(lambda ev: count(ev, "SendDone") == 1)
    assert pair.same_bytes(p)
    pair.audit()


def wait_drained(peer: Peer, timeout_s: float = 10.0) -> Reply:
    deadline = time.monotonic() + timeout_s
    while (account := peer.call("account"))["open"] and time.monotonic() < deadline:
        time.sleep(0.05)
    return account


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["source", "sink"])
def test_kill_while_bytes_are_moving(pair: Pair, victim: str) -> None:
    """No gate: kill -9 one side ~20 ms after 12 MiB of writes started; the survivor's
    accounts balance (each block landed or was released exactly once) and it stays usable."""
    survivor_kinds: list[str] = []
    for _ in range(3):
        pair.send(pair.plan([8] * 24))
        time.sleep(0.02)
        getattr(pair, victim).kill()
        survivor = pair.sink if victim == "source" else pair.source
        if victim == "source":
            time.sleep(0.5)  # claimed transfers are released after the peer-loss grace
            for tid in survivor.call("account")["open"]:  # never claimed: the caller aborts
                survivor.call("abort", tid=tid)
        account = wait_drained(survivor)
        assert account["errors"] == [] and account["open"] == [], account
        survivor_kinds += [
            f"{e['kind']}:{e.get('reason') or e.get('error') or ''}"
            for e in survivor.call("events")["events"]
        ]
        for tid in account["admitted"]:
            survivor.call("finish", tid=tid)
        assert survivor.call("account")["free"] == LAYOUT["num_blocks"]
        pair.respawn(victim)
    print(victim, "killed; survivor saw", {k: survivor_kinds.count(k) for k in set(survivor_kinds)})
    pair.audit()
