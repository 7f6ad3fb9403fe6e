"""`tandem serve --launcher local` (no Ray), end to end with the tiny model in collocated mode:
`tandem scale` up and down under a request stream loses nothing; a worker killed with -9 is
routed around and replaced by a new one (the local launcher has no restarts)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.app import ServeConfig, router_spec, run_serve, worker_spec
from deploy.launcher import Launched
from deploy.local_launcher import ProcessLauncher
from tests.deploy.serve_helpers import (
    CHAT,
    WORKER_ARGS,
    Stream,
    scale,
    wait_until,
    worker_pids,
    workers,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_chat_model_dir: Path) -> Iterator[str]:
    config = ServeConfig(
        model_dir=tiny_chat_model_dir,
        mode="collocated",
        num_prefill=0,
        num_decode=1,
        port=0,
        worker_args=WORKER_ARGS,
        router_args=("--served-model-name", "tiny"),
        start_timeout_s=180,
    )
    launcher = ProcessLauncher(router_spec(config), lambda i, r: worker_spec(config, i, r))
    ready = threading.Event()
    box: dict[str, Any] = {}

    def on_ready(url: str, launched: list[Launched]) -> None:
        box["url"] = url
        ready.set()

    stop = threading.Event()
    # the serve thread spawns the processes and lives until the end: they die with it
    thread = threading.Thread(
        target=lambda: box.setdefault("rc", run_serve(config, launcher, stop, on_ready))
    )
    thread.start()
    try:
        assert ready.wait(240), box
        yield box["url"]
    finally:
        stop.set()
        thread.join(90)
    assert box.get("rc") == 0
    assert worker_pids(tiny_chat_model_dir) == {}


def test_scale_under_load_and_kill_9(served: str, tiny_chat_model_dir: Path) -> None:
    with Stream(served) as stream:
        scale(served, 0, 2)
        n = len(stream.results)
        wait_until("traffic on both", lambda: len(stream.results) >= n + 10)
        scale(served, 0, 1)
        n = len(stream.results)
        wait_until("traffic after the scale-down", lambda: len(stream.results) >= n + 4)
    assert not stream.failures(), stream.failures()[:5]
    routes = " ".join(route for _, route in stream.results)
    assert "decode=decode-0" in routes and "decode=decode-1" in routes

    (victim,) = workers(served)
    os.kill(worker_pids(tiny_chat_model_dir)[victim], signal.SIGKILL)
    wait_until("a replacement", lambda: set(workers(served)) - {victim}, timeout_s=60)
    wait_until(
        "the replacement ready",
        lambda: [w for w in workers(served).values() if w["state"] == "ready"],
    )
    reply = httpx.post(f"{served}/v1/chat/completions", json=CHAT, timeout=60)
    assert reply.status_code == 200, reply.text
    assert f"decode={victim}" not in reply.headers["x-tandem-route"]
