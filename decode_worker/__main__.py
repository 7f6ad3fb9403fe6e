"""`python -m decode_worker`: a decode worker (gRPC DecodeWorker service around the engine)."""

from __future__ import annotations

import os

# Before torch allocates anything: big CPU tensors (the KV pool) on transparent huge pages make
# cross-process copies (UCX CMA) pin 512x fewer pages; NIXL's INFO logs would go to stdout.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import argparse
import asyncio
import sys

from decode_worker.metrics import MeteredDecodeServicer, MeteredShardedSink, MeteredSink
from engine.args import add_engine_args, engine_args_from
from engine.async_engine import AsyncEngine
from engine.engine import Engine
from kv_transfer import registry
from kv_transfer.endpoint_thread import SinkThread
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.grpc_server import new_server, serve_until_signalled
from runtime.tls import add_tls_args, tls_from_args
from runtime.tokenizer import Tokenizer
from runtime.worker_metrics import WorkerLabels, WorkerMetrics
from worker_ranks.launch import Followers, follower_endpoints, init_rank, start_followers


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="decode_worker", description=__doc__)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed on READY)")
    p.add_argument("--worker-id", default="decode-0")
    p.add_argument("--kv-backend", default=registry.DEFAULT_BACKEND, choices=registry.names())
    p.add_argument(
        "--kv-lease-s", type=float, default=30.0, help="how long reserved blocks wait for KV"
    )
    p.add_argument(
        "--metrics-port", type=int, default=0,
        help="Prometheus /metrics on --host (0: any free port; reported by Health)",
    )  # fmt: skip
    add_tls_args(p)
    return p.parse_args(argv)


async def amain(ns: argparse.Namespace, argv: list[str]) -> None:
    if ns.model is None:
        raise SystemExit("decode_worker: --model is required")
    config = engine_args_from(ns, ns.model).resolve()
    try:
        tls = tls_from_args(ns.grpc_tls_cert, ns.grpc_tls_key, ns.grpc_tls_ca)
    except ValueError as exc:
        raise SystemExit(f"{ns.worker_id}: {exc}") from exc
    tokenizer = Tokenizer.from_dir(config.model_dir)
    loop = asyncio.get_running_loop()
    tp = config.tensor_parallel_size
    followers: Followers | None = None
    if tp > 1:  # ranks 1..tp-1 as child processes (worker_ranks), then rank 0 joins them
        followers = start_followers("decode", tp, ns.worker_id, ns.host, ns.kv_backend, argv)
        config = init_rank(config, 0, followers.init_file)
    core = Engine(config, tokenizer)
    remote_ranks = []
    if followers is not None:
        assert core.runner.tp.plan_group is not None
        remote_ranks = follower_endpoints(core.runner.tp.plan_group)
    labels = WorkerLabels("decode", ns.worker_id, config.model_dir.name, config.device)
    metrics = WorkerMetrics(labels, load=lambda: engine.load)  # read at scrape time
    engine = AsyncEngine(core, loop, on_step=metrics.observe_step)
    metrics_server = metrics.serve(ns.host, ns.metrics_port)
    # the sink's control channel binds the same host as the gRPC server (loopback by default);
    # a TP worker runs one sink per rank (each over its kv heads) joined by ShardedSink
    local_sink = registry.make_sink(
        ns.kv_backend,
        core.runner.kv_cache,
        agent_name=ns.worker_id if tp == 1 else f"{ns.worker_id}-tp0",
        host=ns.host,
    )
    sink: MeteredSink | MeteredShardedSink
    if tp == 1:
        sink = MeteredSink(local_sink, loop, metrics)
    else:
        ranks = [SinkThread(local_sink, loop), *(SinkThread(r, loop) for r in remote_ranks)]
        sink = MeteredShardedSink(ranks, metrics)
    identity = worker_rpc.WorkerIdentity(
        worker_id=ns.worker_id,
        role="decode",
        model=str(config.model_dir),
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        metrics_address=metrics_server.address,
    )
    server = new_server()
    servicer = MeteredDecodeServicer(
        identity, engine, sink, metrics, lease_s=ns.kv_lease_s, tls=tls
    )
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)

    async def stop() -> None:
        await servicer.prefill_sessions.close()
        sink.close()
        engine.shutdown()
        if followers is not None:
            followers.stopping = True
            core.runner.stop_followers()
            followers.stop()
        metrics_server.close()

    await serve_until_signalled(
        server, ns.host, ns.port, ns.worker_id, gc_pauses=metrics.gc, on_stop=stop, tls=tls
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    asyncio.run(amain(parse_args(argv), argv))


if __name__ == "__main__":
    main()
