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

`set_young_threshold` (the router) makes young collections rarer. CPython 3.11 collects the
young generation whenever tracked allocations net of frees pass 700, and every tenth young
collection is a middle one. On a server those net allocations are mostly the state of requests
in flight, alive at every collection and walked again each time. In the router at concurrency
32 (SmolLM2, 128 in / 64 out, this 2-core box) that was a young collection every ~5 requests
(~0.5 ms each) and a middle one every ~60 (~2-3 ms), the middle ones inside ~1.5 % of requests'
overhead (its p99). At 10,000 the same load collects once per ~100 requests, 5-15 ms each:
about the same GC time per request (0.14-0.15 ms), in ~20x fewer, longer pauses. The trade:
the overhead's p99 no longer has a collection in it; the loop's longest stall grows (a token
of every stream in flight waits behind it: the ITL's p99.9, not its p99). Memory: up to 10^4
more young objects alive before a collection, well under a megabyte. (CPython 3.13 raised its
own young threshold to 2,000.)
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


SERVING_YOUNG_THRESHOLD = 10_000  # net tracked allocations between young collections (above)


def set_young_threshold(young: int = SERVING_YOUNG_THRESHOLD) -> None:
    """The young generation's threshold; the middle and old ones stay as they are."""
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)


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
