"""ProcessLauncher: the router and the workers as plain local processes (no Ray).

`tandem serve --launcher local`. Workers bind 127.0.0.1; there is no GPU placement and no
restart: a worker that dies is DEAD, and the controller replaces it with a new one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from deploy.launcher import Launched, Phase
from deploy.local_cluster import Child, stop_children
from deploy.process import ProcessSpec, spawn_process, start_process, wait_ready
from router.config import Role

LOOPBACK = "127.0.0.1"


@dataclass(slots=True)
class _Worker:
    role: Role
    seq: int
    child: Child
    phase: Phase = Phase.STARTING
    error: str = ""
    waiter: threading.Thread | None = None  # reads READY, then stops the child


class ProcessLauncher:
    def __init__(
        self,
        router: ProcessSpec,
        worker_spec: Callable[[str, Role], ProcessSpec],
        stop_timeout_s: float = 15.0,
    ) -> None:
        self._router_spec = router
        self._worker_spec = worker_spec
        self._stop_timeout_s = stop_timeout_s
        self._router: Child | None = None
        self._workers: dict[str, _Worker] = {}

    def start_router(self) -> str:
        self._router = start_process(self._router_spec, self._router_spec.host or LOOPBACK)
        return self.router_url()

    def router_url(self) -> str:
        if self._router is None:
            raise RuntimeError("the router is not started")
        return f"http://{self._router.address}"

    def start(self, worker_id: str, role: Role, seq: int) -> None:
        spec = self._worker_spec(worker_id, role)
        # spawned on this (the controller's) thread: the child dies with it, not with a helper
        worker = _Worker(role, seq, spawn_process(spec, spec.host or LOOPBACK))
        worker.waiter = threading.Thread(
            target=self._wait_ready, args=(worker, spec.ready_timeout_s), daemon=True
        )
        worker.waiter.start()
        self._workers[worker_id] = worker

    def _wait_ready(self, worker: _Worker, timeout_s: float) -> None:
        try:
            wait_ready(worker.child, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            worker.error = str(exc)

    def poll(self) -> list[Launched]:
        out: list[Launched] = []
        for worker_id, w in list(self._workers.items()):
            proc = w.child.proc
            if w.phase is Phase.STARTING and w.waiter is not None and not w.waiter.is_alive():
                w.phase = Phase.DEAD if w.error else Phase.RUNNING
            if w.phase is Phase.RUNNING and proc.poll() is not None:
                w.phase, w.error = Phase.DEAD, f"exited with {proc.returncode}"
            if w.phase is Phase.STOPPING and w.waiter is not None and not w.waiter.is_alive():
                del self._workers[worker_id]
                continue
            out.append(
                Launched(
                    worker_id=worker_id,
                    role=w.role,
                    seq=w.seq,
                    phase=w.phase,
                    address=w.child.address or None,
                    pid=proc.pid,
                    error=w.error,
                )
            )
        return out

    def stop(self, worker_id: str) -> None:
        w = self._workers[worker_id]
        w.phase = Phase.STOPPING
        w.waiter = threading.Thread(
            target=stop_children, args=([w.child], self._stop_timeout_s), daemon=True
        )
        w.waiter.start()

    def forget(self, worker_id: str) -> None:
        w = self._workers.pop(worker_id)
        stop_children([w.child], self._stop_timeout_s)

    def shutdown(self) -> None:
        children = [w.child for w in self._workers.values()]
        for w in self._workers.values():
            if w.waiter is not None and w.phase is Phase.STOPPING:
                w.waiter.join()
        self._workers.clear()
        if self._router is not None:
            children.insert(0, self._router)  # the router first: no request to a gone worker
            self._router = None
        stop_children(children, self._stop_timeout_s)
