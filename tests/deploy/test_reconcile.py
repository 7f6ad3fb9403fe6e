"""reconcile(): the controller's pure decision, with literals."""

from __future__ import annotations

from deploy.launcher import Launched, Phase
from deploy.reconcile import Registered, Target, reconcile
from router.config import Role

P, D = Role.PREFILL, Role.DECODE


def running(worker_id: str, role: Role, seq: int, port: int) -> Launched:
    return Launched(worker_id, role, seq, Phase.RUNNING, address=f"127.0.0.1:{port}")


def registered(w: Launched, inflight: int = 0, draining: bool = False) -> Registered:
    assert w.address is not None
    return Registered(w.worker_id, w.role, w.address, draining, inflight)


def test_no_target_only_repairs_registration() -> None:
    p0 = running("prefill-0", P, 0, 1000)
    actions = reconcile(None, [p0], [], set())
    assert actions.register == (p0,)
    assert not (actions.start or actions.drain or actions.stop or actions.forget)


def test_starts_what_is_missing_and_registers_what_runs() -> None:
    p0 = running("prefill-0", P, 0, 1000)
    d0 = Launched("decode-0", D, 1, Phase.STARTING)
    actions = reconcile(Target(2, 2), [p0, d0], [], set())
    assert sorted(r.value for r in actions.start) == ["decode", "prefill"]
    assert actions.register == (p0,)
    assert any("start 1" in r for r in actions.reasons)


def test_in_sync_does_nothing() -> None:
    p0, d0 = running("prefill-0", P, 0, 1000), running("decode-0", D, 1, 1001)
    actions = reconcile(Target(1, 1), [p0, d0], [registered(p0), registered(d0)], set())
    assert not actions


def test_a_restarted_worker_is_registered_at_its_new_address() -> None:
    d0 = running("decode-0", D, 1, 2000)
    stale = Registered("decode-0", D, "127.0.0.1:1001", False, 0)
    actions = reconcile(Target(0, 1), [d0], [stale], set())
    assert actions.register == (d0,)
    assert "was 127.0.0.1:1001" in actions.reasons[0]


def test_scale_down_stops_unregistered_first_then_drains_least_busy() -> None:
    d = [running(f"decode-{i}", D, i, 1000 + i) for i in range(3)]
    starting = Launched("decode-3", D, 3, Phase.STARTING)
    at_router = [registered(d[0], inflight=5), registered(d[1], inflight=1), registered(d[2], 3)]
    actions = reconcile(Target(0, 2), [*d, starting], at_router, set())
    assert actions.stop == ("decode-3",)
    assert actions.drain == ("decode-1",)
    actions = reconcile(Target(0, 1), [*d, starting], at_router, set())
    assert actions.stop == ("decode-3",)
    assert actions.drain == ("decode-1", "decode-2")


def test_a_drained_worker_is_stopped_once_it_left_the_router() -> None:
    d0, d1 = running("decode-0", D, 0, 1000), running("decode-1", D, 1, 1001)
    still_there = reconcile(Target(0, 1), [d0, d1], [registered(d0), registered(d1, 2, True)],
                            {"decode-1"})  # fmt: skip
    assert not still_there  # waiting for its requests: no start, no second drain
    gone = reconcile(Target(0, 1), [d0, d1], [registered(d0)], {"decode-1"})
    assert gone.stop == ("decode-1",) and not gone.start and not gone.register


def test_a_draining_worker_does_not_count_so_a_scale_up_starts_new_ones() -> None:
    d0, d1 = running("decode-0", D, 0, 1000), running("decode-1", D, 1, 1001)
    actions = reconcile(Target(0, 2), [d0, d1], [registered(d0), registered(d1, 1, True)],
                        {"decode-1"})  # fmt: skip
    assert actions.start == (D,)


def test_dead_workers_are_forgotten_and_replaced() -> None:
    dead = Launched("decode-0", D, 0, Phase.DEAD, error="exited with 1")
    actions = reconcile(Target(0, 1), [dead], [], set())
    assert actions.forget == (dead,)
    assert actions.start == (D,)


def test_a_worker_drained_by_an_admin_leaves_and_is_replaced() -> None:
    d0 = running("decode-0", D, 0, 1000)
    actions = reconcile(Target(0, 1), [d0], [registered(d0, draining=True)], set())
    assert actions.drain == ("decode-0",)
    assert actions.start == (D,)


def test_stopping_workers_are_left_alone() -> None:
    stopping = Launched("decode-0", D, 0, Phase.STOPPING, address="127.0.0.1:1")
    actions = reconcile(Target(0, 0), [stopping], [], set())
    assert not actions
