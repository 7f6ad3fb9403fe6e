"""Rank 0's side of a tensor-parallel worker: start the follower ranks, join torch.distributed,
and connect to each follower's KV endpoint (see worker_ranks/__init__.py)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.parallel import IDLE_FOREVER
from kv_transfer.rank_channel import RemoteEndpoint
from kv_transfer.wire import connect

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RankEndpoint:
    """What a follower rank publishes once its endpoint is up (all_gather at start)."""

    rank: int
    channel: str  # host:port of its rank channel (rank 0 connects once)
    agent_name: str  # its KV endpoint's agent
    sink_address: str  # its Sink's control channel; "" for a Source


def init_rank(config: EngineConfig, rank: int, init_file: str) -> EngineConfig:
    """Join the worker's process group (gloo on CPU, NCCL on CUDA with a gloo group for the
    plans, engine/parallel.py) and return the config for this rank (cuda:<rank> on GPUs: the
    worker's GPUs are visible to every rank, CUDA_VISIBLE_DEVICES set by Ray or the user)."""
    world = config.tensor_parallel_size
    kwargs: dict[str, object] = {}
    if config.device.startswith("cuda"):
        if config.device not in ("cuda", "cuda:0"):
            raise ValueError(f"a TP worker uses cuda:0..{world - 1}; got --device {config.device}")
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device(f"cuda:{rank}")
        config = replace(config, device=f"cuda:{rank}")
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=IDLE_FOREVER,  # the model's collectives wait for as long as the worker idles
        **kwargs,  # type: ignore[arg-type]
    )
    return config


def exchange(group: dist.ProcessGroup, mine: RankEndpoint | None) -> list[RankEndpoint]:
    """All ranks: publish this rank's endpoint (rank 0: None); returns the followers'."""
    out: list[RankEndpoint | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine, group=group)
    return [e for e in out if e is not None]


@dataclass
class Followers:
    """Rank 0's handle on ranks 1..N-1: their processes and the rendezvous file."""

    procs: list[subprocess.Popen[bytes]]
    init_dir: str
    stopping: bool = False
    _watchers: list[threading.Thread] = field(default_factory=list)

    @property
    def init_file(self) -> str:
        return os.path.join(self.init_dir, "rendezvous")

    def watch(self) -> None:
        """Exit this process if a follower exits while we are not stopping (one failure unit:
        rank 0 would otherwise wait in a collective forever)."""
        for rank, proc in enumerate(self.procs, start=1):

            def wait(rank: int = rank, proc: subprocess.Popen[bytes] = proc) -> None:
                code = proc.wait()
                if not self.stopping:
                    log.critical("tensor-parallel rank %d exited (%s): exiting", rank, code)
                    os._exit(70)

            t = threading.Thread(target=wait, name=f"rank{rank}-watch", daemon=True)
            t.start()
            self._watchers.append(t)

    def stop(self, timeout_s: float = 10.0) -> None:
        """After stop_followers(): wait for the ranks, kill what does not exit."""
        self.stopping = True
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.init_dir, ignore_errors=True)


def start_followers(
    role: str, world: int, worker_id: str, host: str, kv_backend: str, worker_argv: list[str]
) -> Followers:
    """Start `python -m worker_ranks` for ranks 1..world-1 (they die with this thread's
    process: call from the main thread). The worker's own argv is passed through: every rank
    builds the same engine config from it."""
    init_dir = tempfile.mkdtemp(prefix="tandem-tp-")
    procs = []
    for rank in range(1, world):
        cmd = [
            sys.executable, "-m", "worker_ranks",
            "--role", role, "--rank", str(rank),
            "--init-file", os.path.join(init_dir, "rendezvous"),
            "--parent-pid", str(os.getpid()),
            "--worker-id", worker_id, "--host", host, "--kv-backend", kv_backend,
            "--", *worker_argv,
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd))
    followers = Followers(procs, init_dir)
    followers.watch()
    return followers


def follower_endpoints(group: dist.ProcessGroup, timeout_s: float = 30.0) -> list[RemoteEndpoint]:
    """Rank 0, once its engine is built: the followers' KV endpoints, in rank order, each over
    its rank channel. A rank lost later makes this process exit (one failure unit)."""
    endpoints = sorted(exchange(group, None), key=lambda e: e.rank)
    return [
        RemoteEndpoint(
            connect(e.channel, timeout_s),
            e.rank,
            e.agent_name,
            e.sink_address,
            on_lost=_exit_on_lost,
        )
        for e in endpoints
    ]


def _exit_on_lost(why: str) -> None:
    log.critical("a tensor-parallel rank's KV endpoint is lost (%s): exiting", why)
    os._exit(70)


def listen_once(host: str) -> socket.socket:
    """A blocking listener for the one rank-channel connection rank 0 makes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(1)
    return sock
