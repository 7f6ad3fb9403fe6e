"""Waiting on a live router from tests: one poll loop for every fixture that starts one."""

from __future__ import annotations

import time

import httpx


def wait_healthy(url: str, timeout_s: float = 30.0) -> None:
    """Poll `url`/health until it answers 200 (every worker registered and reachable)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/health").status_code == 200:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url}/health never became 200")
