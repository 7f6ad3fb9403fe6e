"""`tandem serve`: the router and the prefill/decode pools on a launcher, kept at their target
by the controller until SIGTERM/SIGINT.

    launcher.start_router()       the router, with no worker yet
    controller.set_target(P, D)   the initial pools, as `tandem scale` would set them
    controller.wait_settled()     workers started, READY, registered, healthy
    controller.run(stop)          scale requests, restarts and deaths, until told to stop
    launcher.shutdown()           router first, then workers (SIGTERM: in-flight work finishes)
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.admin_client import AdminClient
from deploy.controller import Controller, ControllerConfig, StartFailed
from deploy.launcher import Launched, Launcher
from deploy.process import ProcessSpec
from deploy.reconcile import Target
from router.config import Role

log = logging.getLogger("tandem.serve")

WORKER_MODULES = {Role.PREFILL: "prefill_worker", Role.DECODE: "decode_worker"}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model_dir: Path
    mode: str = "disagg"  # disagg | collocated | auto
    num_prefill: int = 1  # initial target
    num_decode: int = 1
    host: str = "127.0.0.1"  # the router's bind address
    port: int = 8000  # the router's port; 0: any free one
    worker_host: str | None = None  # None: the node's address (loopback on a local cluster)
    worker_args: tuple[str, ...] = ()  # engine flags for every worker
    # ranks (processes; GPUs on a GPU cluster) of each prefill / decode worker
    prefill_tp: int = 1
    decode_tp: int = 1
    # every worker's --tp-invariant-shards (engine/tp_invariant.py): both TP sizes divide it
    tp_invariant_shards: int | None = None
    router_args: tuple[str, ...] = ()
    admin_key: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)  # of the router's /v1/*
    env: Mapping[str, str] = field(default_factory=dict)  # for every process
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "collocated", "auto"):
            raise ValueError(f"mode must be disagg, collocated or auto, got {self.mode!r}")
        if self.num_decode < 1:
            raise ValueError("at least one decode worker is needed")
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be >= 0, got {self.num_prefill}")
        if self.mode == "disagg" and self.num_prefill < 1:
            raise ValueError("disagg mode needs at least one prefill worker")
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError("tensor-parallel sizes must be >= 1")
        if self.prefill_tp > 1 and self.prefill_tp != self.decode_tp:
            # kv_transfer/sharded.py: a prefill worker's TP is 1 or the decode workers'
            raise ValueError(
                f"prefill TP {self.prefill_tp} cannot feed decode TP {self.decode_tp}: "
                "use prefill TP 1 or equal sizes"
            )

        s = self.tp_invariant_shards
        if s is not None and (s < 1 or s % self.prefill_tp or s % self.decode_tp):
            raise ValueError(
                f"--tp-invariant-shards {s} must be a multiple of the prefill TP "
                f"{self.prefill_tp} and the decode TP {self.decode_tp}"
            )

    def tensor_parallel(self, role: Role) -> int:
        return self.prefill_tp if role is Role.PREFILL else self.decode_tp


def router_spec(config: ServeConfig) -> ProcessSpec:
    env = dict(config.env)
    if config.admin_key:
        env["TANDEM_ADMIN_KEY"] = config.admin_key  # not on the command line (ps shows it)
    if config.api_key:
        env["TANDEM_API_KEY"] = config.api_key
    return ProcessSpec(
        name="router",
        module="router",
        args=("--model", str(config.model_dir), "--mode", config.mode, *config.router_args),
        host=config.host,
        port=config.port,
        env=env,
        ready_timeout_s=config.start_timeout_s,
    )


def worker_spec(config: ServeConfig, worker_id: str, role: Role) -> ProcessSpec:
    tp: tuple[str, ...] = ("--tensor-parallel-size", str(config.tensor_parallel(role)))
    if config.tp_invariant_shards is not None:
        tp += ("--tp-invariant-shards", str(config.tp_invariant_shards))
    return ProcessSpec(
        name=worker_id,
        module=WORKER_MODULES[role],
        args=("--model", str(config.model_dir), "--worker-id", worker_id, *config.worker_args, *tp),
        host=config.worker_host,
        env=config.env,
        ready_timeout_s=config.start_timeout_s,
    )


def run_serve(
    config: ServeConfig,
    launcher: Launcher,
    stop: threading.Event,
    on_ready: Callable[[str, list[Launched]], None],
    controller_config: ControllerConfig | None = None,
) -> int:
    """Serve until `stop` is set; returns the exit code. Always shuts the launcher down."""
    admin: AdminClient | None = None
    try:
        url = launcher.start_router()
        admin = AdminClient(url, config.admin_key)
        controller = Controller(launcher, admin, controller_config)
        controller.set_target(Target(config.num_prefill, config.num_decode), "tandem serve")
        controller.wait_settled(config.start_timeout_s)
        on_ready(launcher.router_url(), controller.last_launched)
        controller.run(stop)
    except StartFailed as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 1
    except TimeoutError as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 1
    finally:
        if admin is not None:
            admin.close()
        launcher.shutdown()
    return 0


def placement_table(launched: list[Launched]) -> str:
    rows = []
    for w in sorted(launched, key=lambda w: (w.role.value, w.seq)):
        gpus = ",".join(w.gpu_ids) if w.gpu_ids else "-"
        node = w.node_id[:12] if w.node_id else "local"
        rows.append(
            f"  {w.worker_id:<12} {w.phase.value:<8} {w.address or '-':<21} pid {w.pid or '-':<7} "
            f"gpus {gpus:<8} node {node}"
        )
    return "\n".join(rows)
