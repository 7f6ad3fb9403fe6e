"""A blocking client for the router's admin API (router/admin.py) and its /metrics, shared by
the controller, `tandem scale` and the planner: one scaling path for all three."""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import httpx

from deploy.reconcile import Registered, Target
from router.admin import RECONCILER_HEADER
from router.config import Role


class AdminError(RuntimeError):
    """The router answered an admin call with an error (message from its error body)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class PoolCounts:
    registered: int
    ready: int
    draining: int


@dataclass(frozen=True, slots=True)
class ScaleStatus:
    target: Target | None
    generation: int
    reason: str
    reconciler: str | None
    pools: dict[Role, PoolCounts]

    def settled(self) -> bool:
        """Every pool has exactly its target of ready workers and none draining."""
        if self.target is None:
            return False
        return all(
            self.pools[role].ready == self.target.of(role)
            and self.pools[role].registered == self.target.of(role)
            for role in Role
        )


class AdminClient:
    def __init__(
        self,
        url: str,
        admin_key: str | None = None,
        timeout_s: float = 5.0,
        http: httpx.Client | None = None,  # tests pass FastAPI's TestClient
    ) -> None:
        self.url = url.rstrip("/")
        self._http = http if http is not None else httpx.Client(timeout=timeout_s)
        if admin_key:
            self._http.headers["Authorization"] = f"Bearer {admin_key}"

    def close(self) -> None:
        self._http.close()

    def workers(self) -> list[Registered]:
        body = self._call("GET", "/admin/workers")
        return [
            Registered(
                worker_id=w["worker_id"],
                role=Role(w["role"]),
                address=w["address"],
                draining=w["state"] == "draining",
                inflight=int(w["inflight"]) + int(w["prefilling"]),
            )
            for w in body["workers"]
        ]

    def register(self, worker_id: str, role: Role, address: str) -> None:
        body = {"worker_id": worker_id, "role": role.value, "address": address}
        self._call("POST", "/admin/workers", json=body)

    def drain(self, worker_id: str) -> None:
        """Ask the router to drain the worker (it leaves the list once idle). Idempotent."""
        self._call("DELETE", f"/admin/workers/{worker_id}", allow={404})

    def remove(self, worker_id: str) -> None:
        """Remove the worker now (it is dead: nothing in flight can finish anyway)."""
        self._call("DELETE", f"/admin/workers/{worker_id}", params={"force": "true"}, allow={404})

    def scale_status(self, reconciler: str | None = None) -> ScaleStatus:
        """GET /admin/scale; with `reconciler`, this call is that reconciler's heartbeat."""
        headers = {RECONCILER_HEADER: reconciler} if reconciler else None
        return _scale_status(self._call("GET", "/admin/scale", headers=headers))

    def current_target(self) -> Target:
        """The target, or, before anyone set one, the workers registered now."""
        status = self.scale_status()
        if status.target is not None:
            return status.target
        pools = status.pools
        return Target(pools[Role.PREFILL].registered, pools[Role.DECODE].registered)

    def set_scale(self, prefill: int, decode: int, reason: str = "") -> ScaleStatus:
        body = {"prefill": prefill, "decode": decode, "reason": reason}
        return _scale_status(self._call("PUT", "/admin/scale", json=body))

    def metrics_text(self) -> str:
        reply = self._http.get(f"{self.url}/metrics")
        reply.raise_for_status()
        return reply.text

    def _call(
        self, method: str, path: str, allow: AbstractSet[int] = frozenset(), **kwargs: Any
    ) -> dict[str, Any]:
        reply = self._http.request(method, f"{self.url}{path}", **kwargs)
        if reply.status_code in allow:
            return {}
        if reply.status_code >= 400:
            try:
                message = reply.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = reply.text
            raise AdminError(reply.status_code, message)
        body: dict[str, Any] = reply.json()
        return body


def _scale_status(body: dict[str, Any]) -> ScaleStatus:
    t = body["target"]
    return ScaleStatus(
        target=None if t is None else Target(prefill=t["prefill"], decode=t["decode"]),
        generation=body["generation"],
        reason="" if t is None else t.get("reason", ""),
        reconciler=body["reconciler"],
        pools={
            Role(name): PoolCounts(p["registered"], p["ready"], p["draining"])
            for name, p in body["pools"].items()
        },
    )
