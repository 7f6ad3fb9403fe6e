"""`python -m tests.deploy.fake_worker --host H --port P [--fail]`: a stand-in worker for launcher
tests. It binds a socket, prints `READY <id> host:port` and sleeps until SIGTERM; no torch."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker-id", default="fake")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--fail", action="store_true", help="exit 3 before READY")
    args = p.parse_args()
    if args.fail:
        print("fake worker: failing on purpose", flush=True)
        sys.exit(3)
    sock = socket.create_server((args.host, args.port))
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print(f"READY {args.worker_id} {args.host}:{sock.getsockname()[1]}", flush=True)
    while not stop:
        time.sleep(0.05)
    sock.close()


if __name__ == "__main__":
    main()
