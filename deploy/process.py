"""One Tandem process (router or worker) as a launcher starts it, on any launcher.

`ProcessSpec` is what to run; `start_process` runs it as `python -m <module>` in its own process
group, behind `deploy.child` so that it dies with the process that started it (a Ray actor, or
`tandem serve`), and returns once the child printed `READY <name> <host:port>`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from deploy.local_cluster import Child
from runtime.source_root import child_env


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    name: str  # worker id, or "router"; prefixes its log lines
    module: str  # run as `python -m <module>`
    args: tuple[str, ...]  # everything but --host and --port
    host: str | None = None  # bind address; None: the launcher's node address (loopback locally)
    port: int = 0  # 0: any free port, announced on the READY line
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the launcher's environment
    ready_timeout_s: float = 300.0


def start_process(spec: ProcessSpec, host: str) -> Child:
    """Start the child and wait for its READY line; on failure, kill it and raise."""
    child = spawn_process(spec, host)
    try:
        wait_ready(child, spec.ready_timeout_s)
    except BaseException:
        child.proc.kill()
        child.proc.wait()
        raise
    return child


def spawn_process(spec: ProcessSpec, host: str) -> Child:
    """Start the child; `wait_ready(child, timeout_s)` then reads its READY line.

    The child dies with the *thread* that calls this (PR_SET_PDEATHSIG): call it from a thread
    that lives as long as the launcher (the main thread, or a Ray actor's)."""
    argv = [
        sys.executable, "-m", "deploy.child", str(os.getpid()), spec.module,
        *spec.args, "--host", host, "--port", str(spec.port),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env({**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}),
        start_new_session=True,  # its own process group: stopped by PGID, never by name
    )
    return Child(spec.name, proc)


def wait_ready(child: Child, timeout_s: float) -> str:
    """Wait for the child's `READY <name> <host:port>` line; return host:port. Every other line
    goes to our stderr prefixed with the child's name, before READY and after: a thread reads
    the pipe for the child's whole life (a child blocks once its pipe is full)."""
    ready: queue.Queue[str | None] = queue.Queue()  # the address, or None at EOF
    threading.Thread(target=_read, args=(child, ready), daemon=True).start()
    try:
        address = ready.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"{child.name} not ready after {timeout_s} s") from None
    if address is None:
        child.proc.wait()
        raise RuntimeError(f"{child.name} exited with {child.proc.returncode} at start")
    child.address = address
    return address


def _read(child: Child, ready: queue.Queue[str | None]) -> None:
    stdout = child.proc.stdout
    assert stdout is not None
    announced = False
    with contextlib.suppress(ValueError, OSError):  # the pipe is closed by stop_children
        for line in stdout:
            parts = line.split()
            if not announced and len(parts) == 3 and parts[0] == "READY":
                announced = True
                ready.put(parts[2])
            else:
                sys.stderr.write(f"[{child.name}] {line}")
    if not announced:
        ready.put(None)


def environ_of(pid: int) -> dict[str, str]:
    """Another process's environment as it started (Linux /proc; same user)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """What the owner of a running child reports about it."""

    name: str
    address: str  # host:port from its READY line
    pid: int
    owner_pid: int  # the process that started it (a Ray actor's)
    node_id: str | None  # Ray node id; None outside Ray
    gpu_ids: tuple[str, ...]  # the accelerator ids Ray assigned to the owner
    cuda_visible_devices: str | None  # as the child process sees it
