"""The controller: keeps the workers a launcher runs in line with the router's target.

Each tick (every `interval_s`, on the thread of `tandem serve`):

    observe   GET /admin/scale (also the heartbeat that lets the router accept targets),
              GET /admin/workers, launcher.poll()
    decide    deploy/reconcile.py: reconcile(target, launched, registered, draining)
    act       register / drain / deregister at the router, start / stop / forget at the launcher

A restarted worker (Ray restarts the actor; the process has a new port) is re-registered here
under its id at its new address. A restarted router comes back empty: its workers are
registered again and it is told the last target this controller saw.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from deploy.admin_client import AdminClient, AdminError
from deploy.launcher import Launched, Launcher, Phase
from deploy.reconcile import Actions, Target, reconcile
from router.config import Role

log = logging.getLogger("tandem.controller")


class StartFailed(RuntimeError):
    """Workers of a pool keep dying before they ever became ready: a configuration error."""


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    name: str = "tandem-serve"  # how the router shows who reconciles it
    interval_s: float = 0.5
    # this many workers of one pool in a row dead before READY: give up (StartFailed)
    max_failed_starts: int = 3

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")
        if self.max_failed_starts < 1:
            raise ValueError(f"max_failed_starts must be >= 1, got {self.max_failed_starts}")


class Controller:
    def __init__(
        self, launcher: Launcher, admin: AdminClient, config: ControllerConfig | None = None
    ) -> None:
        self.launcher = launcher
        self.admin = admin
        self.config = config or ControllerConfig()
        self._target: Target | None = None  # the last target seen at the router
        self._draining: set[str] = set()  # ids we asked the router to drain
        self._seq = itertools.count()
        self._next_index: Counter[Role] = Counter()
        self._ran: set[str] = set()  # ids that were RUNNING at least once
        self._failed_starts: Counter[Role] = Counter()  # in a row, per pool
        self.last_launched: list[Launched] = []

    def set_target(self, target: Target, reason: str = "") -> None:
        """Set the router's target (as `tandem scale` does), after a heartbeat so the router
        knows a reconciler is attached."""
        self.admin.scale_status(reconciler=self.config.name)
        self.admin.set_scale(target.prefill, target.decode, reason)
        self._target = target

    def tick(self) -> Actions:
        """One observe-decide-act round. Raises httpx.HTTPError when the router is unreachable
        (it may be restarting), StartFailed when a pool cannot start."""
        self.admin.url = self.launcher.router_url()
        status = self.admin.scale_status(reconciler=self.config.name)
        if status.target is None and self._target is not None:  # the router restarted
            log.warning("the router has no target: telling it %s again", self._target)
            self.admin.set_scale(self._target.prefill, self._target.decode, "router restarted")
        elif status.target is not None:
            self._target = status.target
        registered = self.admin.workers()
        launched = self.launcher.poll()
        self.last_launched = launched
        self._count_failures(launched)
        actions = reconcile(self._target, launched, registered, frozenset(self._draining))
        for reason in actions.reasons:
            log.info("%s", reason)
        self._act(actions)
        return actions

    def run(self, stop: threading.Event) -> None:
        """Tick until `stop` is set. A router that does not answer (it may be restarting) or
        refuses a call is retried every tick; each new error is logged once."""
        last_error = ""
        while not stop.is_set():
            try:
                self.tick()
                last_error = ""
            except (httpx.HTTPError, AdminError) as exc:
                if str(exc) != last_error:
                    last_error = str(exc)
                    log.warning("router: %s: %s; retrying", type(exc).__name__, exc)
            stop.wait(self.config.interval_s)

    def wait_settled(self, timeout_s: float) -> None:
        """Tick until every pool has its target of ready workers (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.tick()
                if self.admin.scale_status().settled():
                    return
            except httpx.HTTPError as exc:
                log.info("router not answering yet (%s)", exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"pools not ready after {timeout_s:.0f} s")
            time.sleep(self.config.interval_s)

    # ------------------------------------------------------------ acting

    def _act(self, actions: Actions) -> None:
        for w in actions.forget:
            self.admin.remove(w.worker_id)
            self.launcher.forget(w.worker_id)
            self._draining.discard(w.worker_id)
        for w in actions.register:
            assert w.address is not None
            try:
                self.admin.register(w.worker_id, w.role, w.address)
            except AdminError as exc:  # e.g. drained meanwhile: the next tick sees it
                log.warning("register %s: %s", w.worker_id, exc)
        for worker_id in actions.drain:
            self.admin.drain(worker_id)
            self._draining.add(worker_id)
        for worker_id in actions.stop:
            self.launcher.stop(worker_id)
            self._draining.discard(worker_id)
        for role in actions.start:
            if self._failed_starts[role] >= self.config.max_failed_starts:
                raise StartFailed(
                    f"{self._failed_starts[role]} {role.value} workers in a row died before "
                    "they were ready; see their output above"
                )
            index = self._next_index[role]
            self._next_index[role] += 1
            self.launcher.start(f"{role.value}-{index}", role, next(self._seq))

    def _count_failures(self, launched: list[Launched]) -> None:
        for w in launched:
            if w.phase is Phase.RUNNING and w.worker_id not in self._ran:
                self._ran.add(w.worker_id)
                self._failed_starts[w.role] = 0
            elif w.phase is Phase.DEAD and w.worker_id not in self._ran:
                self._failed_starts[w.role] += 1
