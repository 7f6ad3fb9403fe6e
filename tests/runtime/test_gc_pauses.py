"""runtime/gc_pauses.py: every collection is timed by generation while installed, none after;
the startup heap is frozen out of collections; the young threshold is raised alone."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry

from runtime.gc_pauses import GcPauses, freeze_startup_heap, set_young_threshold


def _count(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value(
        "tandem_test_gc_pause_seconds_count", {"role": "decode", "generation": generation}
    )
    assert value is not None
    return value


def test_pauses_are_timed_by_generation_while_installed() -> None:
    registry = CollectorRegistry()
    pauses = GcPauses("tandem_test", registry, {"role": "decode"})
    pauses.install()
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.uninstall()
    assert _count(registry, "0") >= 1
    assert _count(registry, "2") >= 2
    total = registry.get_sample_value(
        "tandem_test_gc_pause_seconds_sum", {"role": "decode", "generation": "2"}
    )
    assert total is not None and total > 0
    before = _count(registry, "2")
    gc.collect(2)
    assert _count(registry, "2") == before
    pauses.uninstall()  # idempotent


def test_freeze_moves_the_live_heap_out_of_collections() -> None:
    try:
        frozen = freeze_startup_heap()
        # not equal to a later get_freeze_count(): a frozen object freed by refcount meanwhile
        # (a temporary, another thread's garbage) leaves the permanent generation
        assert frozen > 1000
        assert 0 < gc.get_freeze_count() <= frozen + 1000
    finally:
        gc.unfreeze()  # the test process goes on collecting its own garbage


def test_young_threshold_is_raised_alone() -> None:
    before = gc.get_threshold()
    try:
        set_young_threshold(12_345)
        assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        gc.set_threshold(*before)
