"""`python -m worker_ranks`: rank r > 0 of a tensor-parallel worker (started by rank 0,
worker_ranks/launch.py): its model shard, its KV endpoint, and every step rank 0 broadcasts."""

from __future__ import annotations

import os

# as in the worker entry points: before torch allocates the pool
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import argparse
import ctypes
import logging
import signal
import threading

import torch.distributed as dist

from engine.args import add_engine_args, engine_args_from
from engine.engine import runner_class
from kv_transfer import registry
from kv_transfer.base import KVSink, KVSource
from kv_transfer.rank_channel import serve_rank
from kv_transfer.wire import Connection
from worker_ranks.launch import RankEndpoint, exchange, init_rank, listen_once

PR_SET_PDEATHSIG = 1
log = logging.getLogger("worker_ranks")


def agent_name(worker_id: str, rank: int) -> str:
    return f"{worker_id}-tp{rank}"


def main() -> None:
    p = argparse.ArgumentParser(prog="worker_ranks", description=__doc__)
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--init-file", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--kv-backend", default=registry.DEFAULT_BACKEND)
    p.add_argument("worker_argv", nargs=argparse.REMAINDER)
    ns = p.parse_args()
    # Die with rank 0 (set before anything else; then check it is still there).
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != ns.parent_pid:
        raise SystemExit(f"worker_ranks: rank 0 ({ns.parent_pid}) is gone")
    # Rank 0 alone decides when to stop (stop_followers); a signal to the whole process group
    # (a terminal's Ctrl-C, a launcher's SIGTERM) must not take a rank out under it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp{ns.rank} %(message)s")

    engine_parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(engine_parser)
    worker_argv = ns.worker_argv[1:] if ns.worker_argv[:1] == ["--"] else ns.worker_argv
    ens, _ = engine_parser.parse_known_args(worker_argv)  # the worker's own flags are ignored
    if ens.model is None:
        raise SystemExit("worker_ranks: --model is required")
    config = init_rank(engine_args_from(ens, ens.model).resolve(), ns.rank, ns.init_file)
    try:
        runner = runner_class(config)(config)
        name = agent_name(ns.worker_id, ns.rank)
        endpoint: KVSink | KVSource
        if ns.role == "decode":
            endpoint = registry.make_sink(
                ns.kv_backend, runner.kv_cache, agent_name=name, host=ns.host
            )
            sink_address = endpoint.address
        else:
            endpoint = registry.make_source(ns.kv_backend, runner.kv_cache, agent_name=name)
            sink_address = ""
        listener = listen_once(ns.host)
        channel = f"{ns.host}:{listener.getsockname()[1]}"
        assert runner.tp.plan_group is not None
        exchange(runner.tp.plan_group, RankEndpoint(ns.rank, channel, name, sink_address))
        listener.settimeout(60.0)
        sock, _ = listener.accept()  # rank 0, once
        listener.close()
        conn = Connection(sock)
        thread = threading.Thread(target=serve_rank, args=(endpoint, conn), daemon=True)
        thread.start()
        runner.serve_followers()  # until rank 0's stop_followers()
        conn.close()
        thread.join(timeout=10)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
