"""Admission control: shed a request with 503 + Retry-After when every decode worker is saturated.

A decode worker is saturated when the choices this router admitted to it, and whose responses
have not ended, reach its limit: `AdmissionConfig.max_inflight_per_worker`, by default twice the
max_num_seqs the worker reports in Load (one batch running, at most one batch waiting in the
engine's queue). Routing only sees unsaturated decode workers; when none is left, the request
is refused before anything is dispatched.

The router keeps no queue of its own, so what it holds is bounded: at most limit x workers
admitted requests (plus, per worker, the choices of the one request that crossed its limit: a
request's choices for one prompt all go to one worker), and a refused request costs only its
parse. The engine's waiting queue is the only queue, bounded by the same limit. Load drops ->
a slot frees when a response ends -> the next request is admitted: there is nothing to drain.

Counting is the router's own, per request (`Slot`): charged in the same event-loop turn as the
routing decision (so a burst cannot overshoot between deciding and dispatching) and released
exactly once, when the response has ended (`Frontend.finish_timing`), whatever ended it.
Everything runs on the event loop thread; nothing is locked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from router.config import AdmissionConfig, Role
from router.errors import Overloaded
from router.policy import WorkerSnapshot


@dataclass(slots=True, eq=False)
class Slot:
    """One request's admitted choices; mutable, owned by its Plan."""

    held: dict[str, int] = field(default_factory=dict)  # decode worker id -> choices
    released: bool = False


class Admission:
    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self._held: dict[str, int] = {}  # decode worker id -> choices admitted, not ended

    def limit(self, max_num_seqs: int) -> int:
        """Choices a decode worker that reports `max_num_seqs` may have in flight."""
        if self.config.max_inflight_per_worker is not None:
            return self.config.max_inflight_per_worker
        return 2 * max_num_seqs

    def held(self) -> Mapping[str, int]:
        return self._held

    def open_workers(self, workers: Sequence[WorkerSnapshot]) -> list[WorkerSnapshot]:
        """`workers` without the saturated decode workers. Raises Overloaded when there are
        healthy decode workers and every one of them is saturated (no healthy one at all is
        the router's ordinary 'no healthy decode worker' 503)."""
        saturated = {
            w.worker_id
            for w in workers
            if w.role is Role.DECODE
            and w.healthy
            and self._held.get(w.worker_id, 0) >= self.limit(w.max_num_seqs)
        }
        if saturated and not any(
            w.role is Role.DECODE and w.healthy and w.worker_id not in saturated for w in workers
        ):
            raise Overloaded(
                f"every decode worker is saturated ({len(saturated)} at their in-flight "
                "limit); retry later",
                self.config.retry_after_s,
            )
        return [w for w in workers if w.worker_id not in saturated]

    def charge(self, slot: Slot, worker_id: str, num_choices: int) -> None:
        assert not slot.released, "a released slot is charged again"
        slot.held[worker_id] = slot.held.get(worker_id, 0) + num_choices
        self._held[worker_id] = self._held.get(worker_id, 0) + num_choices

    def move(self, slot: Slot, from_worker_id: str, to_worker_id: str) -> None:
        """One admitted choice went on on another decode worker (router/migration.py): its
        charge follows it. A no-op once the slot is released."""
        if slot.released:
            return
        assert slot.held.get(from_worker_id, 0) > 0, "a choice moves from where it was charged"
        self._give_back(slot.held, from_worker_id, 1)
        self._give_back(self._held, from_worker_id, 1)
        self.charge(slot, to_worker_id, 1)

    def release(self, slot: Slot) -> bool:
        """Give the slot's choices back; False when it was released already (idempotent)."""
        if slot.released:
            return False
        slot.released = True
        for worker_id, n in slot.held.items():
            self._give_back(self._held, worker_id, n)
        return True

    @staticmethod
    def _give_back(held: dict[str, int], worker_id: str, n: int) -> None:
        left = held[worker_id] - n
        if left:
            held[worker_id] = left
        else:
            del held[worker_id]  # workers come and go: no entry per idle worker
