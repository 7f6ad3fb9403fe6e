"""`python -m prefill_worker`: a prefill worker (gRPC PrefillWorker service + KV source)."""

from __future__ import annotations

import os

# Before torch allocates anything: big CPU tensors (the KV pool) on transparent huge pages make
# cross-process copies (UCX CMA) pin 512x fewer pages; NIXL's INFO logs would go to stdout.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

import argparse
import asyncio

from engine.args import add_engine_args, engine_args_from
from engine.async_engine import AsyncEngine
from engine.engine import Engine
from kv_transfer import registry
from prefill_worker.metrics import MeteredPrefillServicer, MeteredSource
from proto import tandem_pb2_grpc as pb_grpc
from runtime import worker_rpc
from runtime.grpc_server import new_server, serve_until_signalled
from runtime.tls import add_tls_args, tls_from_args
from runtime.tokenizer import Tokenizer
from runtime.worker_metrics import WorkerLabels, WorkerMetrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prefill_worker", description=__doc__)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed on READY)")
    p.add_argument("--worker-id", default="prefill-0")
    p.add_argument("--kv-backend", default=registry.DEFAULT_BACKEND, choices=registry.names())
    p.add_argument(
        "--metrics-port", type=int, default=0,
        help="Prometheus /metrics on --host (0: any free port; reported by Health)",
    )  # fmt: skip
    add_tls_args(p)
    return p.parse_args(argv)


async def amain(ns: argparse.Namespace) -> None:
    if ns.model is None:
        raise SystemExit("prefill_worker: --model is required")
    config = engine_args_from(ns, ns.model).resolve()
    try:
        tls = tls_from_args(ns.grpc_tls_cert, ns.grpc_tls_key, ns.grpc_tls_ca)
    except ValueError as exc:
        raise SystemExit(f"{ns.worker_id}: {exc}") from exc
    tokenizer = Tokenizer.from_dir(config.model_dir)
    loop = asyncio.get_running_loop()
    core = Engine(config, tokenizer)
    labels = WorkerLabels("prefill", ns.worker_id, config.model_dir.name, config.device)
    metrics = WorkerMetrics(labels, load=lambda: engine.load)  # read at scrape time
    engine = AsyncEngine(core, loop, on_step=metrics.observe_step)
    metrics_server = metrics.serve(ns.host, ns.metrics_port)
    source = MeteredSource(
        registry.make_source(ns.kv_backend, core.runner.kv_cache, agent_name=ns.worker_id),
        loop,
        metrics,
    )
    identity = worker_rpc.WorkerIdentity(
        worker_id=ns.worker_id,
        role="prefill",
        model=str(config.model_dir),
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        metrics_address=metrics_server.address,
    )
    server = new_server()
    servicer = MeteredPrefillServicer(identity, engine, source, metrics)
    pb_grpc.add_PrefillWorkerServicer_to_server(servicer, server)

    async def stop() -> None:
        source.close()
        engine.shutdown()
        metrics_server.close()

    await serve_until_signalled(server, ns.host, ns.port, ns.worker_id, on_stop=stop, tls=tls)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
