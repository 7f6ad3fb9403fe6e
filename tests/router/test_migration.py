"""router/migration.py: which failures migrate, where a choice goes on, and its admission
charge following it (the end-to-end behaviour is tests/integration/test_chaos.py)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from router.admission import Admission, Slot
from router.config import AdmissionConfig, PolicyConfig, Role
from router.errors import ServiceUnavailable
from router.migration import Progress, WorkerLost, continuation_route, migratable
from router.policy import Unroutable, WorkerSnapshot

POLICY = PolicyConfig()


def decode(worker_id: str, address: str = "", **kw: object) -> WorkerSnapshot:
    base = WorkerSnapshot(
        worker_id=worker_id, address=address or f"{worker_id}:1", role=Role.DECODE,
        healthy=True, block_size=16, max_model_len=512, num_blocks_total=100,
        num_blocks_free=100,
    )  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def lost(worker_id: str, address: str) -> WorkerLost:
    return WorkerLost(worker_id, address, ServiceUnavailable("gone"))


def test_only_a_lost_worker_migrates() -> None:
    assert migratable(grpc.StatusCode.UNAVAILABLE) and migratable(grpc.StatusCode.CANCELLED)
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
    ):
        assert not migratable(code)


def test_the_continuation_prefills_locally_elsewhere_and_counts_the_output() -> None:
    progress = Progress(output_token_ids=list(range(40)))
    prefill = dataclasses.replace(decode("p0"), role=Role.PREFILL)
    workers = [decode("d0"), decode("d1", num_inflight=5), prefill]
    # the lost worker still looks healthy (its stream merely ended): it is left out anyway
    decision = continuation_route(
        list(range(24)), progress, {}, workers, lost("d0", "d0:1"), 1, POLICY
    )
    assert decision.decode_worker_id == "d1" and decision.prefill_worker_id is None
    assert decision.uncached_tokens == 64  # prompt 24 + output 40, all to recompute


def test_a_restarted_worker_at_a_new_address_may_take_it_back() -> None:
    workers = [decode("d0", address="d0:2")]
    decision = continuation_route([1, 2], Progress(), {}, workers, lost("d0", "d0:1"), 0, POLICY)
    assert decision.decode_address == "d0:2"
    with pytest.raises(Unroutable):
        continuation_route([1, 2], Progress(), {}, workers, lost("d0", "d0:2"), 0, POLICY)


def test_the_admission_charge_follows_a_moved_choice() -> None:
    admission = Admission(AdmissionConfig())
    slot = Slot()
    admission.charge(slot, "d0", 2)
    admission.move(slot, "d0", "d1")
    assert dict(admission.held()) == {"d0": 1, "d1": 1}
    admission.move(slot, "d0", "d1")
    assert dict(admission.held()) == {"d1": 2}
    assert admission.release(slot)
    admission.move(slot, "d1", "d0")  # released: nothing to move
    assert dict(admission.held()) == {}
