"""SinkLedger: leases and fencing as a pure state machine (no processes, no clock)."""

from __future__ import annotations

import pytest

from kv_transfer.base import KVLanded, KVLost, KVReleased, ReleaseReason
from kv_transfer.ledger import Phase, SinkLedger


def ledger(one_sided: bool = True, grace_s: float = 0.05) -> SinkLedger:
    return SinkLedger(num_blocks=16, needs_source_ack=one_sided, peer_loss_grace_s=grace_s)


def kinds(events: list[object]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_claim_then_landing_returns_the_blocks_to_the_caller() -> None:
    led = ledger()
    t = led.expect("a", [3, 4, 9], deadline=10.0)
    granted, why = led.claim(t.generation, "p", now=1.0)
    assert granted is t and why == "" and t.phase is Phase.GRANTED
    assert led.landed(t.generation, "intruder", 1) == []  # only the claimant lands it
    [landed] = led.landed(t.generation, "p", 3 * 128)
    assert landed == KVLanded("a", t.generation, (3, 4, 9), 3 * 128)
    assert led.num_open == 0 and led.held_blocks() == frozenset()


def test_unclaimed_lease_expires_and_frees_at_once() -> None:
    led = ledger()
    t = led.expect("a", [1, 2], deadline=5.0)
    assert led.expire(4.9) == ([], [])
    events, fenced = led.expire(5.0)
    assert kinds(events) == ["KVLost", "KVReleased"] and fenced == []
    assert events[1] == KVReleased("a", t.generation, (1, 2), ReleaseReason.EXPIRED)
    assert led.claim(t.generation, "p", now=5.1)[0] is None  # a late claim is refused


def test_one_sided_fence_waits_for_the_source_ack() -> None:
    led = ledger(one_sided=True)
    t = led.expect("a", [1, 2], deadline=5.0)
    led.claim(t.generation, "p", now=1.0)
    events, fenced = led.lose("a", ReleaseReason.ABORTED, "client left", now=2.0)
    assert kinds(events) == ["KVLost"] and fenced is t and t.phase is Phase.FENCING
    assert led.expire(100.0) == ([], [])  # a fencing transfer does not expire again
    assert led.release_ready(100.0) == []  # no ack: the WRITE may still land
    assert led.held_blocks() == frozenset({1, 2})
    with pytest.raises(ValueError, match="open"):
        led.expect("b", [2, 3], deadline=50.0)  # quarantined blocks cannot be reused
    assert led.landed(t.generation, "p", 1) == []  # a late landing does not resurrect it
    [released] = led.source_quiet(t.generation, "p", None, now=3.0)
    assert released == KVReleased("a", t.generation, (1, 2), ReleaseReason.ABORTED)


def test_two_sided_fence_needs_only_a_quiet_transport() -> None:
    led = ledger(one_sided=False)
    t = led.expect("a", [1, 2], deadline=5.0)
    led.claim(t.generation, "p", now=1.0)
    led.set_transport_quiet(t.generation, False)  # a receive into block 1 is running
    events, _ = led.lose("a", ReleaseReason.EXPIRED, "lease expired", now=5.0)
    assert kinds(events) == ["KVLost"]
    led.set_transport_quiet(t.generation, True)
    assert kinds(led.release_ready(5.1)) == ["KVReleased"]


def test_peer_loss_releases_claims_after_the_grace_and_keeps_unclaimed_handles() -> None:
    led = ledger(one_sided=True, grace_s=0.5)
    t1 = led.expect("claimed", [1], deadline=50.0)
    led.expect("unclaimed", [2], deadline=50.0)
    led.claim(t1.generation, "p", now=1.0)
    events = led.peer_lost("p", now=2.0)
    assert kinds(events) == ["KVLost"] and events[0] == KVLost(
        "claimed", t1.generation, ReleaseReason.PEER_LOST, "source p disconnected mid-transfer"
    )
    assert led.next_wakeup(2.0) == 2.5
    assert led.release_ready(2.4) == []
    assert kinds(led.release_ready(2.5)) == ["KVReleased"]
    assert led.find("unclaimed") is not None and led.num_open == 1


def test_source_failure_after_grant_loses_and_releases() -> None:
    led = ledger(one_sided=True)
    t = led.expect("a", [1], deadline=50.0)
    led.claim(t.generation, "p", now=1.0)
    events = led.source_quiet(t.generation, "p", "NIXL error", now=2.0)
    assert kinds(events) == ["KVLost", "KVReleased"]
    assert events[0].reason is ReleaseReason.FAILED  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("blocks", "message"),
    [([], "at least one"), ([1, 1], "repeats"), ([16], "outside"), ([-1], "outside")],
)
def test_expect_rejects_bad_block_lists(blocks: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ledger().expect("a", blocks, deadline=1.0)


def test_generations_are_fresh_per_expect_and_stale_claims_fail() -> None:
    led = ledger()
    t1 = led.expect("a", [1], deadline=1.0)
    led.lose("a", ReleaseReason.ABORTED, "", now=0.5)
    t2 = led.expect("a", [1], deadline=9.0)  # same transfer id, next incarnation
    assert t2.generation > t1.generation
    assert led.claim(t1.generation, "p", now=0.6) == (
        None,
        "unknown generation (expired, aborted, finished or never issued)",
    )
    assert led.claim(t2.generation, "p", now=0.6)[0] is t2
    assert led.claim(t2.generation, "q", now=0.6)[0] is None  # one claimant only
