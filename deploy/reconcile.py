"""The controller's decision, as a pure function: what to do so that the workers the launcher
runs, the workers the router knows and the target agree.

    reconcile(target, launched, registered, draining) -> Actions

No I/O and no clock; deploy/controller.py gathers the three views and carries the actions out.
Per role, in order:

    DEAD                               forget (deregister it at once; a new one is started below)
    ours, draining, left the router    stop (its drain finished: nothing of it is in flight)
    router says draining, we did not   drain (an admin DELETEd it: it leaves, and is replaced)
    RUNNING, not at the router         register (a new worker, or one that moved: restarted)
    fewer active than the target       start the difference
    more active than the target        stop the surplus that never registered (no traffic),
                                       then drain registered ones, least in flight first

Active = STARTING or RUNNING and not draining. Scale-down never stops a registered worker
directly: it is drained first, and stopped only once the router has let it go.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

from deploy.launcher import Launched, Phase
from router.config import Role


@dataclass(frozen=True, slots=True)
class Target:
    prefill: int
    decode: int

    def of(self, role: Role) -> int:
        return self.prefill if role is Role.PREFILL else self.decode


@dataclass(frozen=True, slots=True)
class Registered:
    """One worker as the router lists it (GET /admin/workers)."""

    worker_id: str
    role: Role
    address: str
    draining: bool
    inflight: int  # choices streaming from it plus prompts it is computing


@dataclass(frozen=True, slots=True)
class Actions:
    start: tuple[Role, ...] = ()  # one entry per worker to start
    register: tuple[Launched, ...] = ()
    drain: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    forget: tuple[Launched, ...] = ()
    reasons: tuple[str, ...] = ()  # one line per action, for the log

    def __bool__(self) -> bool:
        return bool(self.start or self.register or self.drain or self.stop or self.forget)


def reconcile(
    target: Target | None,
    launched: Sequence[Launched],
    registered: Sequence[Registered],
    draining: Set[str],
) -> Actions:
    """`draining`: ids the controller asked the router to drain. `target` None: nobody set
    one yet, so nothing is started or stopped; registration is still repaired."""
    at_router = {r.worker_id: r for r in registered}
    start: list[Role] = []
    register: list[Launched] = []
    drain: list[str] = []
    stop: list[str] = []
    forget: list[Launched] = []
    reasons: list[str] = []
    for role in Role:
        active: list[Launched] = []
        for w in (w for w in launched if w.role is role):
            r = at_router.get(w.worker_id)
            if w.phase is Phase.DEAD:
                forget.append(w)
                reasons.append(f"{w.worker_id}: dead ({w.error or 'no reason given'}): forget")
            elif w.phase is Phase.STOPPING:
                continue
            elif w.worker_id in draining:
                if r is None:
                    stop.append(w.worker_id)
                    reasons.append(f"{w.worker_id}: drained: stop")
            elif r is not None and r.draining:
                drain.append(w.worker_id)
                reasons.append(f"{w.worker_id}: drained at the router by someone else: it leaves")
            else:
                active.append(w)
                if w.phase is Phase.RUNNING and (r is None or r.address != w.address):
                    register.append(w)
                    moved = "" if r is None else f" (was {r.address})"
                    reasons.append(f"{w.worker_id}: running at {w.address}{moved}: register")
        if target is None:
            continue
        want = target.of(role)
        if len(active) < want:
            start.extend([role] * (want - len(active)))
            reasons.append(f"{role.value}: {len(active)} active < target {want}: start "
                           f"{want - len(active)}")  # fmt: skip
        elif len(active) > want:
            surplus = _victims(active, at_router)[: len(active) - want]
            for w in surplus:
                if w.worker_id in at_router:
                    drain.append(w.worker_id)
                    reasons.append(f"{w.worker_id}: {role.value} above target {want}: drain")
                else:
                    stop.append(w.worker_id)
                    reasons.append(f"{w.worker_id}: {role.value} above target {want}, never "
                                   "registered: stop")  # fmt: skip
            # a worker registered in this same round must not be drained and registered at once
            register = [w for w in register if w not in surplus]
    return Actions(
        start=tuple(start),
        register=tuple(register),
        drain=tuple(drain),
        stop=tuple(stop),
        forget=tuple(forget),
        reasons=tuple(reasons),
    )


def _victims(active: list[Launched], at_router: dict[str, Registered]) -> list[Launched]:
    """Scale-down order: workers without traffic first (not registered: starting, or running
    but not yet registered), newest first; then registered ones, least in flight first."""

    def key(w: Launched) -> tuple[int, int, int]:
        r = at_router.get(w.worker_id)
        if r is None:
            return (0, 0, -w.seq)
        return (1, r.inflight, -w.seq)

    return sorted(active, key=key)
