"""What a launcher does for the controller, whoever runs the processes (Ray actors or plain
local processes): start a worker, say what each one is doing, stop one.

Every call is non-blocking and made from the controller's thread; `poll()` is where progress
(a worker that became ready, restarted or died) is picked up.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from router.config import Role


class Phase(enum.Enum):
    STARTING = "starting"  # asked for; not READY yet (placement, process start, model load)
    RUNNING = "running"  # READY at `address`
    STOPPING = "stopping"  # stop() was called; gone from poll() once it exited
    DEAD = "dead"  # failed for good (start failed, restarts exhausted): forget() it


@dataclass(frozen=True, slots=True)
class Launched:
    """One worker as its launcher knows it."""

    worker_id: str
    role: Role
    seq: int  # start order (higher: newer)
    phase: Phase
    address: str | None = None  # host:port of its gRPC server once RUNNING
    pid: int | None = None  # the worker process
    node_id: str | None = None  # where it runs (Ray node id; None locally)
    gpu_ids: tuple[str, ...] = ()  # as assigned by Ray (CUDA_VISIBLE_DEVICES of the process)
    restarts: int = 0  # times it came back with a new process
    error: str = ""  # why it is DEAD


class Launcher(Protocol):
    def start_router(self) -> str:
        """Start the router and return its URL once it listens (blocking)."""
        ...

    def router_url(self) -> str:
        """The router's URL now (it may have moved after a restart)."""
        ...

    def start(self, worker_id: str, role: Role, seq: int) -> None:
        """Begin starting a worker; it shows up in poll() as STARTING at once."""
        ...

    def poll(self) -> list[Launched]:
        """Every worker started and not yet stopped or forgotten."""
        ...

    def stop(self, worker_id: str) -> None:
        """Begin a graceful stop (SIGTERM, then SIGKILL after a grace); the worker must no
        longer be registered at the router. It leaves poll() once it exited."""
        ...

    def forget(self, worker_id: str) -> None:
        """Drop a DEAD worker and release whatever it held (its GPUs)."""
        ...

    def shutdown(self) -> None:
        """Stop every worker and the router (blocking). Idempotent."""
        ...
