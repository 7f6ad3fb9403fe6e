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

`LoopCollector` (the router) takes collections out of requests altogether: automatic collection
is off, and the event loop runs CPython's own schedule (a young collection once the allocation
count passes the first threshold, an older generation every `threshold` collections of the one
below) as a timer callback of its own. A callback never runs inside a coroutine's await-free
stretch, so a pause lands between requests' segments instead of in one of them; it still delays
whatever is ready behind it, exactly as before, and is still timed by GcPauses.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

_PAUSE_BUCKETS_S = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip


_POLL_S = 0.025  # how often LoopCollector looks at the allocation count (~40 cheap wakeups/s)


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


class LoopCollector:
    """Garbage collection as an event-loop timer instead of at allocation time. Between two
    looks the young generation can outgrow the first threshold by what the process allocates
    in `poll_s` (~10^3 objects for the router under load, a sub-millisecond young collection).
    Start and stop it on the loop's thread; `stop` turns automatic collection back on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, poll_s: float = _POLL_S) -> None:
        self.loop = loop
        self.poll_s = poll_s
        self.thresholds = gc.get_threshold()  # (young, middle, old): CPython's, or the process's
        self.collections = [0, 0, 0]  # by the generation collected, for tests and logs
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._timer is not None:
            raise RuntimeError("LoopCollector already started")
        gc.disable()
        self._timer = self.loop.call_later(self.poll_s, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.enable()

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self.poll_s, self._tick)
        # gc.get_count(): net allocations since the last young collection, young collections
        # since the last middle one, middle collections since the last full one. CPython's own
        # choice at allocation time: the oldest generation whose count passed its threshold.
        counts = gc.get_count()
        if counts[0] <= self.thresholds[0]:
            return
        generation = next(g for g in (2, 1, 0) if g == 0 or counts[g] > self.thresholds[g])
        gc.collect(generation)
        self.collections[generation] += 1
