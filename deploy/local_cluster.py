"""LocalCluster: prefill and decode workers and the router as local processes (no Ray).

Used by `tandem serve --launcher local` and by integration tests. Every child is started and
stopped by PID; nothing is killed by name. Everything binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runtime.source_root import child_env


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000  # the router's HTTP port; 0: any free port
    num_prefill: int = 1
    num_decode: int = 1
    mode: str = "disagg"  # disagg | collocated | auto
    worker_args: tuple[str, ...] = ()  # extra engine flags for every worker
    router_args: tuple[str, ...] = ()
    start_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in ("disagg", "collocated", "auto"):
            raise ValueError(f"mode must be disagg, collocated or auto, got {self.mode!r}")
        if self.num_decode < 1:
            raise ValueError("at least one decode worker is needed")
        if self.mode == "disagg" and self.num_prefill < 1:
            raise ValueError("disagg mode needs at least one prefill worker")


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[str]
    address: str = ""  # host:port announced on the READY line
    ready: queue.Queue[str] = field(default_factory=queue.Queue)  # the READY address, once


@dataclass(slots=True)
class LocalCluster:
    config: ClusterConfig
    children: list[Child] = field(default_factory=list)
    url: str = ""

    def start(self) -> LocalCluster:
        """Start every worker, wait until each is READY, then the router. Raises on failure
        (after stopping whatever did start)."""
        try:
            workers = [
                self._spawn(f"prefill-{i}", "prefill_worker", self._worker_args(f"prefill-{i}"))
                for i in range(self.config.num_prefill)
            ] + [
                self._spawn(f"decode-{i}", "decode_worker", self._worker_args(f"decode-{i}"))
                for i in range(self.config.num_decode)
            ]
            for child in workers:
                child.address = self._wait_ready(child)
            router = self._spawn("router", "router", self._router_args(workers))
            router.address = self._wait_ready(router)
            self.url = f"http://{router.address}"
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_args(self, worker_id: str) -> list[str]:
        c = self.config
        return [
            "--model", str(c.model_dir), "--host", c.host, "--port", "0",
            "--worker-id", worker_id, *c.worker_args,
        ]  # fmt: skip

    def _router_args(self, workers: list[Child]) -> list[str]:
        c = self.config
        pools = {
            kind: ",".join(f"{w.name}={w.address}" for w in workers if w.name.startswith(kind))
            for kind in ("prefill", "decode")
        }
        args = ["--model", str(c.model_dir), "--host", c.host, "--port", str(c.port)]
        args += ["--mode", c.mode, "--decode", pools["decode"]]
        if pools["prefill"]:
            args += ["--prefill", pools["prefill"]]
        return args + list(c.router_args)

    def _spawn(self, name: str, module: str, args: list[str]) -> Child:
        child = spawn(name, module, args)
        self.children.append(child)
        return child

    def _wait_ready(self, child: Child) -> str:
        return wait_ready(child, self.config.start_timeout_s)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def kill(self, name: str) -> None:
        """`kill -9` a worker's process group (a crash, for fault tests); it stays dead until
        `restart`."""
        child = self.child(name)
        _signal_group(child.proc, signal.SIGKILL)
        child.proc.wait()

    def restart(self, name: str) -> str:
        """Start a dead worker again under its id (a fresh process at a new port, as Ray's
        restart would) and register its new address with the router (POST /admin/workers),
        which then routes to it once it answers Health. Returns the new address."""
        from deploy.admin_client import AdminClient  # httpx; only the fault tests restart
        from router.config import Role

        old = self.child(name)
        if old.proc.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {old.proc.pid})")
        stop_children([old])
        self.children.remove(old)
        module = "prefill_worker" if name.startswith("prefill") else "decode_worker"
        child = self._spawn(name, module, self._worker_args(name))
        child.address = self._wait_ready(child)
        role = Role.PREFILL if module == "prefill_worker" else Role.DECODE
        admin = AdminClient(self.url)
        try:
            admin.register(name, role, child.address)
        finally:
            admin.close()
        return child.address

    def stop(self) -> None:
        """Stop every child (by PID, router first). Idempotent."""
        stop_children(list(reversed(self.children)))
        self.children.clear()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(name: str, module: str, args: list[str]) -> Child:
    """Start `python -m module args...` in its own process group, stdout piped."""
    env = child_env({**os.environ, "PYTHONUNBUFFERED": "1", "UCX_NET_DEVICES": "lo"})
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # our own process group: stop_children signals it by PGID
    )
    child = Child(name, proc)
    # One reader per child, for its whole life: it hands the READY line over and forwards
    # everything else to our stderr. (select() on the pipe plus a buffered readline() misses
    # lines that arrive together, and an unread pipe blocks the child once it is full.)
    threading.Thread(target=_read_stdout, args=(child,), daemon=True).start()
    return child


def wait_ready(child: Child, timeout_s: float) -> str:
    """Wait for the child's `READY <name> <host:port>` line; return host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            child.address = child.ready.get(timeout=0.5)
            return child.address
        except queue.Empty:
            if child.proc.poll() is not None and child.ready.empty():
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode} at start"
                ) from None
    raise TimeoutError(f"{child.name} not ready after {timeout_s} s")


def _read_stdout(child: Child) -> None:
    assert child.proc.stdout is not None
    with contextlib.suppress(ValueError, OSError):  # the pipe is closed by stop_children
        for line in child.proc.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "READY" and child.ready.empty():
                child.ready.put(parts[2])
            else:
                sys.stderr.write(f"[{child.name}] {line}")


def stop_children(children: list[Child], timeout_s: float = 15.0) -> None:
    """SIGTERM each child's process group, then SIGKILL what is left after timeout_s."""
    for child in children:
        if child.proc.poll() is None:
            _signal_group(child.proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()
        if child.proc.stdout is not None:
            child.proc.stdout.close()


def _signal_group(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, sig)  # the group we created for this child (start_new_session)
