"""runtime/gc_pauses.py: every collection is timed by generation while installed, none after;
the startup heap is frozen out of collections; LoopCollector collects on its loop's timer only."""

from __future__ import annotations

import asyncio
import gc
import weakref

from prometheus_client import CollectorRegistry

from runtime.gc_pauses import GcPauses, LoopCollector, freeze_startup_heap


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


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_loop_collector_collects_on_the_loop_never_at_allocation() -> None:
    async def run() -> None:
        collector = LoopCollector(asyncio.get_running_loop(), poll_s=0.01)
        collector.start()
        try:
            assert not gc.isenabled()
            probe = weakref.ref(_Node())
            garbage = [_Node() for _ in range(5 * collector.thresholds[0])]
            del garbage
            assert probe() is not None  # far past the young threshold, and nothing collected
            for _ in range(100):
                await asyncio.sleep(0.01)
                if probe() is None:
                    break
            assert probe() is None  # the loop's timer collected it
            assert collector.collections[0] >= 1
        finally:
            collector.stop()

    asyncio.run(run())
    assert gc.isenabled()  # stop gives automatic collection back
