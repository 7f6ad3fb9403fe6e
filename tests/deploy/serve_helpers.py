"""Helpers for the end-to-end serving tests: a request stream, `tandem scale`, and the worker
processes as /proc shows them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from deploy.cli import main as tandem
from deploy.process import environ_of

WORKER_ARGS = ("--num-blocks", "256", "--max-model-len", "512", "--block-size", "16")
CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8,
    "ignore_eos": True,
}


def worker_pids(model_dir: Path) -> dict[str, int]:
    """worker id -> pid of this test's worker processes, from /proc (what `ps` shows)."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        ours = str(model_dir) in args and "--worker-id" in args
        if ours and args[1:3] in (["-m", "prefill_worker"], ["-m", "decode_worker"]):
            found[args[args.index("--worker-id") + 1]] = int(entry)
    return found


def gpus_of(model_dir: Path) -> dict[str, str]:
    return {w: environ_of(pid).get("CUDA_VISIBLE_DEVICES", "") for w, pid in
            worker_pids(model_dir).items()}  # fmt: skip


def workers(url: str) -> dict[str, dict[str, Any]]:
    reply = httpx.get(f"{url}/admin/workers", timeout=10).json()
    return {w["worker_id"]: w for w in reply["workers"]}


def wait_until(what: str, check: Any, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Stream:
    """`concurrency` clients sending chat requests back to back until stopped."""

    def __init__(self, url: str, concurrency: int = 2) -> None:
        self.url = url
        self.results: list[tuple[int, str]] = []  # (status, x-tandem-route or error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(concurrency)]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/chat/completions", json=CHAT)
                    self.results.append((r.status_code, r.headers.get("x-tandem-route", r.text)))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))

    def failures(self) -> list[tuple[int, str]]:
        return [r for r in self.results if r[0] != 200]


def scale(url: str, prefill: int, decode: int) -> None:
    argv = ["scale", "--url", url, "--prefill", str(prefill), "--decode", str(decode)]
    assert tandem([*argv, "--timeout-s", "180"]) == 0
