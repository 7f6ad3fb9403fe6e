"""Admin API (`/admin/*`): who is in the pools, and how big they should be.

The router never starts or stops a process. It keeps two things a launcher acts on:

    /admin/workers   membership: POST registers a worker (or its new address after a
                     restart), DELETE drains one (no new requests; it leaves the registry once
                     nothing dispatched to it is in flight), GET lists them with their state.
    /admin/scale     the target size of each pool, set by `tandem scale` or the planner (PUT),
                     read by the reconciler that owns the processes (GET with the
                     `x-tandem-reconciler` header, deploy/controller.py), which starts workers,
                     registers them, drains the surplus and stops a worker once it has left.

A target nobody carries out would be a silent no-op, so PUT /admin/scale is refused (409)
unless a reconciler polled within RECONCILER_STALE_S. With an admin key every call needs
`Authorization: Bearer <key>`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Response
from pydantic import BaseModel, Field

from router.config import Role, WorkerAddress
from router.errors import InvalidRequest, RouterError, Unauthorized
from router.guard import bearer_matches
from router.registry import WorkerConflict, WorkerRegistry, WorkerState

RECONCILER_HEADER = "x-tandem-reconciler"
RECONCILER_STALE_S = 10.0  # a reconciler polls every ~0.5 s; this long without one: none


class NotFound(RouterError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(RouterError):
    status_code = 409
    error_type = "conflict"


# ---------------------------------------------------------------- wire models


class WorkerRegistration(BaseModel):
    worker_id: str
    role: Role
    address: str = Field(description="host:port of the worker's gRPC server")


class WorkerStatus(BaseModel):
    worker_id: str
    role: Role
    address: str
    state: Literal["ready", "not_ready", "draining"]  # ready: routable now
    reachable: bool  # the last Health/Load call succeeded
    inflight: int  # choices streaming from it (as decode worker)
    prefilling: int  # choices whose prompt it computes, first token not back


class WorkerList(BaseModel):
    workers: list[WorkerStatus]


class ScaleTarget(BaseModel):
    prefill: int = Field(ge=0, description="prefill workers")
    decode: int = Field(ge=0, description="decode workers")
    reason: str = Field("", description="why (shown in GET /admin/scale and the logs)")


class PoolStatus(BaseModel):
    registered: int  # draining ones included
    ready: int
    draining: int


class ScaleStatus(BaseModel):
    target: ScaleTarget | None  # None until someone sets one
    generation: int  # +1 per PUT that changed the target
    reconciler: str | None  # who carries the target out; None: nobody polled yet
    reconciler_seen_s_ago: float | None
    pools: dict[str, PoolStatus]  # "prefill", "decode"


@dataclass(slots=True)
class ScaleState:
    target: ScaleTarget | None = None
    generation: int = 0
    reconciler: str | None = None
    reconciler_seen_s: float | None = None  # clock() of its last poll


# ---------------------------------------------------------------- routes


def add_admin_routes(
    app: FastAPI,
    registry: WorkerRegistry,
    admin_key: str | None,
    clock: Callable[[], float] = time.monotonic,
) -> ScaleState:
    """Mount `/admin/*` on `app`; returns the (mutable) scale state it serves."""
    scale = ScaleState()

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if admin_key is None:
            return
        # Starlette decodes header bytes as latin-1: encoding back gives the raw bytes
        if not bearer_matches((authorization or "").encode("latin-1"), admin_key):
            raise Unauthorized("the admin API needs `Authorization: Bearer <admin key>`")

    admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorize)])

    @admin.get("/workers", response_model=WorkerList)
    async def list_workers() -> WorkerList:
        return WorkerList(workers=[_status(s) for s in registry.states()])

    @admin.post("/workers", response_model=WorkerStatus, status_code=201)
    async def register(body: WorkerRegistration, response: Response) -> WorkerStatus:
        try:
            worker = WorkerAddress(body.worker_id, body.address, body.role)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        known = registry.get(worker.worker_id) is not None
        try:
            registry.add(worker)
        except WorkerConflict as exc:
            raise Conflict(str(exc)) from exc
        if known:  # the same worker again, or at its new address after a restart
            response.status_code = 200
        state = registry.get(worker.worker_id)
        assert state is not None
        return _status(state)

    @admin.delete("/workers/{worker_id}", status_code=202)
    async def deregister(
        worker_id: str,
        response: Response,
        force: Annotated[bool, Query(description="remove now, cutting its requests")] = False,
    ) -> dict[str, str]:
        if registry.get(worker_id) is None:
            raise NotFound(f"no worker {worker_id}")
        if force:
            await registry.remove(worker_id)
            response.status_code = 200
            return {"worker_id": worker_id, "state": "removed"}
        registry.drain(worker_id)
        return {"worker_id": worker_id, "state": "draining"}

    @admin.get("/scale", response_model=ScaleStatus)
    async def get_scale(
        reconciler: Annotated[str | None, Header(alias=RECONCILER_HEADER)] = None,
    ) -> ScaleStatus:
        if reconciler:
            scale.reconciler, scale.reconciler_seen_s = reconciler, clock()
        return _scale_status(scale, registry, clock())

    @admin.put("/scale", response_model=ScaleStatus)
    async def set_scale(body: ScaleTarget) -> ScaleStatus:
        now = clock()
        seen = scale.reconciler_seen_s
        if seen is None or now - seen > RECONCILER_STALE_S:
            raise Conflict(
                "no launcher is reconciling this router's pools (none polled /admin/scale in "
                f"the last {RECONCILER_STALE_S:.0f} s): start it with `tandem serve`, or "
                "register workers with POST /admin/workers"
            )
        old = scale.target
        if old is None or (old.prefill, old.decode) != (body.prefill, body.decode):
            scale.generation += 1
        scale.target = body
        return _scale_status(scale, registry, now)

    app.include_router(admin)
    return scale


def _status(s: WorkerState) -> WorkerStatus:
    state: Literal["ready", "not_ready", "draining"]
    state = "draining" if s.draining else "ready" if s.healthy else "not_ready"
    return WorkerStatus(
        worker_id=s.worker.worker_id,
        role=s.worker.role,
        address=s.worker.address,
        state=state,
        reachable=s.reachable,
        inflight=s.num_inflight,
        prefilling=s.num_prefilling,
    )


def _scale_status(scale: ScaleState, registry: WorkerRegistry, now: float) -> ScaleStatus:
    pools = {role.value: PoolStatus(registered=0, ready=0, draining=0) for role in Role}
    for s in registry.states():
        pool = pools[s.worker.role.value]
        pool.registered += 1
        pool.ready += int(s.healthy)
        pool.draining += int(s.draining)
    seen = scale.reconciler_seen_s
    return ScaleStatus(
        target=scale.target,
        generation=scale.generation,
        reconciler=scale.reconciler,
        reconciler_seen_s_ago=None if seen is None else round(now - seen, 3),
        pools=pools,
    )
