"""Issue 5, acceptance 2: `ray start --head` on loopback, then
`ray job submit --working-dir . -- tandem serve ...` serves chat requests.

The head uses its own --temp-dir and non-default ports, and is stopped by the PIDs of its own
processes (those whose command line names that temp dir, and their descendants); never
`ray stop`, which kills every Ray process on the machine by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.admin_client import AdminClient

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def processes_of(markers: list[str]) -> list[int]:
    """PIDs whose command line names one of `markers` (our temp dir, our GCS address), and
    all their descendants. `ray start` exits once its processes run, so they are orphans:
    the markers find them; the descendants are the workers and agents the raylet started."""
    parents: dict[int, int] = {}
    roots: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
                if any(m.encode() in cmdline for m in markers):
                    roots.add(pid)
            with open(f"/proc/{pid}/stat") as f:
                parents[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def stop_processes(pids: list[int], timeout_s: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture()
def head() -> Iterator[tuple[dict[str, str], str]]:
    temp_dir = tempfile.mkdtemp(prefix="tdhead-")  # short: Ray's socket paths
    gcs, dashboard, client, agent = free_ports(4)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the job's `tandem` and `python`
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every Ray process on 127.0.0.1
        "RAY_AUTH_MODE": "disabled",
        "UCX_NET_DEVICES": "lo",
        "NIXL_LOG_LEVEL": "WARN",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=4", "--num-gpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true",
        "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=120)
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        stop_processes(processes_of([temp_dir, f"127.0.0.1:{gcs}"]))
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_tandem_serve_answers_chat(
    head: tuple[dict[str, str], str], tiny_chat_model_dir: Path
) -> None:
    env, address = head
    (port,) = free_ports(1)
    ray = [str(BIN / "ray"), "job"]
    submit = [
        *ray, "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
        "--", "tandem", "serve", "--model", str(tiny_chat_model_dir), "--port", str(port),
        "--num-blocks", "256", "--max-model-len", "512",
    ]  # fmt: skip
    out = subprocess.run(submit, env=env, check=True, capture_output=True, text=True, timeout=120)
    job_id = next(
        word.strip("'")
        for line in out.stdout.splitlines()
        for word in line.split()
        if word.strip("'").startswith("raysubmit_")
    )

    def job(*args: str) -> str:
        cmd = [*ray, *args, "--address", address, job_id]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout

    url = f"http://127.0.0.1:{port}"
    admin = AdminClient(url)
    deadline = time.monotonic() + 300
    try:
        while True:  # until both pools are registered and ready (what `tandem serve` waits for)
            try:
                if admin.scale_status().settled():
                    break
            except httpx.HTTPError:
                pass
            status = job("status")
            assert "FAILED" not in status and "STOPPED" not in status, job("logs")
            assert time.monotonic() < deadline, f"not serving after 300 s:\n{job('logs')}"
            time.sleep(1)
        body = {
            "model": tiny_chat_model_dir.name,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
        }
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert json.loads(reply.text)["choices"][0]["message"]["role"] == "assistant"
        route = reply.headers["x-tandem-route"]
        assert "mode=disagg" in route and "prefill=prefill-0" in route
        logs = job("logs")
        assert "Tandem is serving" in logs and "gpus 0" in logs and "gpus 1" in logs, logs
    finally:
        admin.close()
        job("stop")
