"""RayLauncher: the router and every worker as a Ray actor that owns one process.

Why an actor that owns a process, rather than the worker running inside the actor:

- Ray assigns the GPUs to the actor and sets CUDA_VISIBLE_DEVICES in its environment; the
  worker process inherits it, so the worker is exactly the `python -m decode_worker` that the
  local launcher and the tests run, with its own asyncio loop, signal handlers and threads
  (none of which Ray's worker process lets it own).
- The worker is a plain PID: `kill -9` hits the worker alone, SIGTERM drains its gRPC server
  gracefully, and its memory is not Ray's.
- A crash is still Ray's to recover: when the process dies the actor exits (`_watch`), Ray
  restarts the actor (`max_restarts`), and the new actor starts a new process. The process
  dies with its actor (deploy/child.py), so `ray.kill` or a lost actor never leaves an orphan
  holding a GPU.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from deploy.launcher import Launched, Phase
from deploy.local_cluster import Child, stop_children
from deploy.placement import Node, PoolPlacement, preferred_node
from deploy.process import ProcessInfo, ProcessSpec, environ_of, start_process
from router.config import Role

log = logging.getLogger("tandem.ray")

STOP_GRACE_S = 15.0  # SIGTERM to SIGKILL for a worker process


class ProcessActor:
    """Owns one child process for its whole life (Ray actor; methods run on its main thread)."""

    def __init__(self, spec: ProcessSpec) -> None:
        self._spec = spec
        self._stopping = False
        self._node_id = ray.get_runtime_context().get_node_id()
        self._gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        host = spec.host or ray.util.get_node_ip_address()
        self._child: Child = start_process(spec, host)
        threading.Thread(target=self._watch, name="watch-child", daemon=True).start()

    def _watch(self) -> None:
        rc = self._child.proc.wait()
        if self._stopping:
            return
        # Hazard: exiting the actor is how Ray learns about the crash. Its restart (up to
        # max_restarts) runs __init__ again, which starts a new process on a new port; the
        # controller then re-registers the worker under its id at that address.
        print(f"{self._spec.name}: process exited with {rc}; restarting", file=sys.stderr,
              flush=True)  # fmt: skip
        os._exit(1)

    def info(self) -> ProcessInfo:
        pid = self._child.proc.pid
        try:
            cuda = environ_of(pid).get("CUDA_VISIBLE_DEVICES")
        except OSError:  # it just exited; _watch is about to end this actor
            cuda = None
        return ProcessInfo(
            name=self._spec.name,
            address=self._child.address,
            pid=pid,
            owner_pid=os.getpid(),
            node_id=self._node_id,
            gpu_ids=self._gpu_ids,
            cuda_visible_devices=cuda,
        )

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the process (its gRPC server finishes what it has), SIGKILL after timeout_s.
        Returns its exit code."""
        self._stopping = True
        stop_children([self._child], timeout_s)
        return self._child.proc.returncode


# Any: Ray's typing of remote handles does not model `.options(...).remote(...)` chains
RemoteProcessActor: Any = ray.remote(ProcessActor)


@dataclass(slots=True)
class _Actor:
    role: Role
    seq: int
    handle: Any  # ray.actor.ActorHandle of a ProcessActor
    group: PlacementGroup | None
    phase: Phase = Phase.STARTING
    info: ProcessInfo | None = None
    info_ref: ray.ObjectRef | None = None  # at most one info() call in flight
    stop_ref: ray.ObjectRef | None = None
    stop_deadline: float = 0.0
    restarts: int = 0
    error: str = ""


class RayLauncher:
    """Non-blocking: every method only submits Ray calls, poll() collects their results."""

    def __init__(
        self,
        router: ProcessSpec,
        worker_spec: Callable[[str, Role], ProcessSpec],
        placement: dict[Role, PoolPlacement],
        max_restarts: int = 5,
        router_num_cpus: float = 0.0,
    ) -> None:
        self._router_spec = router
        self._worker_spec = worker_spec
        self._placement = placement
        self._max_restarts = max_restarts
        self._router_num_cpus = router_num_cpus
        self._router: Any = None  # ActorHandle of its ProcessActor
        self._router_info: ProcessInfo | None = None
        self._router_ref: ray.ObjectRef | None = None
        self._actors: dict[str, _Actor] = {}

    # ------------------------------------------------------------ router

    def start_router(self) -> str:
        """The router runs on the driver's node (where `tandem serve` or the Ray job's
        entrypoint runs), so the printed URL is the one users reach."""
        here = ray.get_runtime_context().get_node_id()
        self._router = RemoteProcessActor.options(
            name=None,
            num_cpus=self._router_num_cpus,
            max_restarts=self._max_restarts,
            max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(self._router_spec)
        timeout_s = self._router_spec.ready_timeout_s + 60
        self._router_info = ray.get(self._router.info.remote(), timeout=timeout_s)
        return self.router_url()

    def router_url(self) -> str:
        if self._router is None or self._router_info is None:
            raise RuntimeError("the router is not started")
        if self._router_ref is None:
            self._router_ref = self._router.info.remote()
        ready, _ = ray.wait([self._router_ref], timeout=0)
        if ready:
            ref, self._router_ref = self._router_ref, None
            try:
                self._router_info = ray.get(ref)
            except (RayActorError, ActorUnavailableError) as exc:
                log.warning("router actor: %s", _first_line(exc))
        return f"http://{self._router_info.address}"

    # ------------------------------------------------------------ workers

    def start(self, worker_id: str, role: Role, seq: int) -> None:
        spec = self._worker_spec(worker_id, role)
        placement = self._placement[role]
        bundle = placement.bundle()
        group: PlacementGroup | None = None
        strategy: object = "DEFAULT"
        if bundle:
            hint = self._preferred_node(role, placement)
            # _soft_target_node_id: Ray's (experimental) soft node hint, STRICT_PACK only
            group = placement_group(
                [bundle], strategy="STRICT_PACK", name=f"tandem-{worker_id}",
                _soft_target_node_id=hint,
            )  # fmt: skip
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
        handle = RemoteProcessActor.options(
            name=None,
            num_cpus=placement.num_cpus,
            num_gpus=placement.num_gpus,
            max_restarts=self._max_restarts,
            max_task_retries=-1,  # info()/stop() wait out a restart instead of failing
            scheduling_strategy=strategy,
        ).remote(spec)
        actor = _Actor(role, seq, handle, group)
        actor.info_ref = handle.info.remote()
        self._actors[worker_id] = actor

    def poll(self) -> list[Launched]:
        pending: list[ray.ObjectRef] = [
            ref
            for a in self._actors.values()
            for ref in (a.info_ref, a.stop_ref)
            if ref is not None
        ]
        ready = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0]) if pending else set()
        now = time.monotonic()
        out: list[Launched] = []
        for worker_id, a in list(self._actors.items()):
            if a.phase is Phase.STOPPING:
                if a.stop_ref in ready or now > a.stop_deadline:
                    self._release(a)
                    del self._actors[worker_id]
                    continue
            elif a.info_ref is not None and a.info_ref in ready:
                self._collect_info(worker_id, a)
            out.append(self._launched(worker_id, a))
        return out

    def _collect_info(self, worker_id: str, a: _Actor) -> None:
        ref, a.info_ref = a.info_ref, None
        assert ref is not None
        try:
            info: ProcessInfo = ray.get(ref)
        except ActorUnavailableError:  # transient (restarting, unreachable): ask again
            a.info_ref = a.handle.info.remote()
            return
        except RayActorError as exc:  # dead for good: creation failed or restarts exhausted
            a.phase, a.error = Phase.DEAD, _first_line(exc)
            return
        if a.info is not None and info.pid != a.info.pid:
            a.restarts += 1
            log.info("%s restarted: pid %d at %s", worker_id, info.pid, info.address)
        a.info, a.phase = info, Phase.RUNNING
        a.info_ref = a.handle.info.remote()

    def stop(self, worker_id: str) -> None:
        a = self._actors[worker_id]
        starting = a.phase is Phase.STARTING
        a.phase = Phase.STOPPING
        a.info_ref = None
        if starting:  # still placing or loading (stop() would queue behind it): kill it now
            a.stop_deadline = 0.0
            return
        a.stop_ref = a.handle.stop.remote(STOP_GRACE_S)
        a.stop_deadline = time.monotonic() + STOP_GRACE_S + 15.0

    def forget(self, worker_id: str) -> None:
        self._release(self._actors.pop(worker_id))

    def shutdown(self) -> None:
        """The router first (no new requests), then every worker: SIGTERM, then the actors and
        their placement groups (the GPUs are free for the next user of a long-lived cluster).
        Blocking, at most about STOP_GRACE_S + 20 s."""
        if self._router is not None:
            _stop_actors([self._router])
            self._router = None
        actors = list(self._actors.values())
        self._actors.clear()
        _stop_actors([a.handle for a in actors if a.phase is not Phase.DEAD])
        groups = [a.group for a in actors if a.group is not None]
        # Hazard: remove_placement_group blocks when the cluster is going down with us (a
        # terminal's Ctrl-C or SIGTERM to the process group reaches the raylet too); the groups
        # share this driver's fate anyway, so give up on them after a few seconds.
        remover = threading.Thread(
            target=lambda: [remove_placement_group(g) for g in groups], daemon=True
        )
        remover.start()
        remover.join(5.0)

    # ------------------------------------------------------------ helpers

    def _release(self, a: _Actor) -> None:
        ray.kill(a.handle, no_restart=True)
        if a.group is not None:
            remove_placement_group(a.group)

    def _launched(self, worker_id: str, a: _Actor) -> Launched:
        info = a.info
        gpu_ids: tuple[str, ...] = ()
        if info is not None:
            cuda = info.cuda_visible_devices
            gpu_ids = tuple(cuda.split(",")) if cuda else info.gpu_ids
        return Launched(
            worker_id=worker_id,
            role=a.role,
            seq=a.seq,
            phase=a.phase,
            address=info.address if info is not None else None,
            pid=info.pid if info is not None else None,
            node_id=info.node_id if info is not None else None,
            gpu_ids=gpu_ids,
            restarts=a.restarts,
            error=a.error,
        )

    def _preferred_node(self, role: Role, placement: PoolPlacement) -> str | None:
        nodes = [Node(n["NodeID"], n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
        placed = [(a.role, a.info.node_id) for a in self._actors.values() if a.info is not None]
        pool = [node for r, node in placed if r is role and node is not None]
        everyone = [node for _, node in placed if node is not None]
        return preferred_node(placement, nodes, pool, everyone)


def _stop_actors(handles: list[Any]) -> None:
    """Stop each actor's process (in parallel), then the actors; errors of dead ones ignored."""
    refs = [h.stop.remote(STOP_GRACE_S) for h in handles]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 15.0)
    for h in handles:
        ray.kill(h, no_restart=True)


def _first_line(exc: BaseException) -> str:
    """A one-line reason. A failed __init__ comes as a traceback whose last line says why."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if "creation task" in lines[0] else lines[0]


@dataclass(frozen=True, slots=True)
class RayClusterConfig:
    # None: start an embedded single-node cluster for this process (and shut it down after);
    # else ray.init's address ("auto", "ray://...", host:port) of an existing cluster
    address: str | None = None
    num_cpus: int | None = None  # embedded only; None: Ray counts them
    num_gpus: int | None = None  # embedded only; None: Ray detects them (set it to fake GPUs)
    object_store_mb: int = 128  # embedded only: Tandem moves nothing through the object store


def connect(config: RayClusterConfig) -> None:
    """ray.init for `tandem serve`, with Ray's dashboard off on an embedded cluster.

    The embedded cluster uses address="local": with no address, ray.init would join any
    `ray start` cluster it finds on the machine (someone else's, on a shared host)."""
    if config.address is None:
        ray.init(
            address="local",
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            include_dashboard=False,
            object_store_memory=config.object_store_mb << 20,
        )
    else:
        ray.init(address=config.address)


def cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))
