"""Python's cyclic garbage collector on a serving process: the startup heap frozen out of its
full collections, and every pause timed.

Hazard: a collection runs inside whatever code allocated the object that crossed a threshold,
so its pause lands in one request's segment (router overhead, a worker's step). A full
(generation 2) collection walks every tracked container object; after startup that is the
tokenizer's vocabulary, FastAPI/pydantic schemas, protobuf descriptors, Ray's and gRPC's
modules: ~10^5-10^6 objects, milliseconds per walk, for objects that live as long as the process.
`freeze_startup_heap()` moves everything alive at the end of startup into the permanent
generation, which collections skip (CPython's gc.freeze, made for this); objects allocated
later are collected as before, so nothing leaks that would not have leaked anyway.

`GcPauses` times each collection (gc.callbacks: two calls per collection, ~1 us) into a
histogram by generation, so what is left shows in /metrics instead of as unexplained tails.
Callbacks run on the thread that triggered the collection, with the GIL held: the start stamp
needs no lock (one collection at a time per process).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

_PAUSE_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is alive (call when startup is done, before serving).
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """`<prefix>_gc_pause_seconds{<labels>, generation}`: one observation per collection,
    once installed (the process's entry point installs it; tests build many, install none)."""

    def __init__(self, prefix: str, registry: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self.pause_s = Histogram(
            f"{prefix}_gc_pause_seconds",
            "Python garbage-collection pauses of this process, by the generation collected "
            "(the startup heap is frozen out of them: runtime/gc_pauses.py)",
            [*labels, "generation"],
            buckets=_PAUSE_BUCKETS_S,
            registry=registry,
        )
        # children resolved once: the callback must not allocate label tuples per collection
        self._by_generation = [self.pause_s.labels(*labels.values(), str(g)) for g in range(3)]
        self._start_s = 0.0  # perf_counter at the current collection's start

    def install(self) -> None:
        gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start_s = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._start_s)
