"""`python -m router --model DIR [--decode ID=host:port[,..]] [--prefill ...] [--mode auto]`.

Config is built here, once, into a frozen RouterConfig; uvicorn runs the app on 127.0.0.1 unless
told otherwise. Prints `READY router host:port` once it is listening (--port 0: any free port).
Workers are given here, or registered at run time through `/admin/workers` (router/admin.py);
the admin key comes from --admin-key or $TANDEM_ADMIN_KEY, the API key from --api-key or
$TANDEM_API_KEY (prefer the variables: a command line is visible to every local user).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvicorn
import uvloop

from router.config import (
    AdmissionConfig,
    Limits,
    Mode,
    PolicyConfig,
    Role,
    RouterConfig,
    parse_workers,
)
from router.server import build_app
from runtime.gc_pauses import freeze_startup_heap, set_young_threshold
from runtime.tls import add_tls_args, tls_from_args
from runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    p.add_argument("--model", required=True, help="local Hugging Face model dir (tokenizer)")
    p.add_argument("--served-model-name", help="the `model` clients name (default: dir name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed on READY)")
    p.add_argument(
        "--decode", default="",
        help="decode workers: ID=host:port[,ID=host:port] (more can register via /admin/workers)",
    )  # fmt: skip
    p.add_argument("--prefill", default="", help="prefill workers: ID=host:port[,...]")
    p.add_argument("--mode", default="auto", choices=[m.value for m in Mode])
    p.add_argument(
        "--max-model-len", type=int, default=None,
        help="validate prompts against this before the workers report theirs",
    )  # fmt: skip
    p.add_argument(
        "--local-prefill-max-tokens", type=int, default=256,
        help="auto mode: prefill on an idle decode worker up to this many uncached tokens",
    )  # fmt: skip
    p.add_argument(
        "--prefill-budget-s", type=float, default=0.5,
        help="auto mode: a long prompt goes to a prefill worker while its estimated prefill "
        "time there (queue + prompt at the measured rate) is at most this; past it, to the "
        "decode worker when that would be sooner",
    )  # fmt: skip
    p.add_argument(
        "--prefill-weight", type=float, default=1.0,
        help="cost weight of a block to prefill against a block of KV held",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout-s", type=float, default=600.0,
        help="a request still running after this long ends with 504 and is aborted on its workers",
    )  # fmt: skip
    p.add_argument(
        "--migration-limit", type=int, default=3,
        help="times a choice may move to another decode worker when its worker is lost "
        "mid-stream (0: never)",
    )  # fmt: skip
    p.add_argument(
        "--stream-interval", type=int, default=1,
        help="tokens per SSE chunk of a streamed response (the decode worker sends them in "
        "one message; the first token always alone): fewer router wakeups, burstier chunks",
    )  # fmt: skip
    p.add_argument("--load-interval-s", type=float, default=0.2)
    p.add_argument(
        "--admin-key", default=os.environ.get("TANDEM_ADMIN_KEY"),
        help="bearer token for /admin/* (default: $TANDEM_ADMIN_KEY; unset: no auth)",
    )  # fmt: skip
    p.add_argument(
        "--api-key", default=os.environ.get("TANDEM_API_KEY"),
        help="bearer token for /v1/* (default: $TANDEM_API_KEY; unset: no auth)",
    )  # fmt: skip
    limits = p.add_argument_group("limits (beyond them: 400, 413 for the body)")
    limits.add_argument("--max-body-bytes", type=int, default=Limits().max_body_bytes)
    limits.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="default: the context length"
    )  # fmt: skip
    limits.add_argument(
        "--max-output-tokens", type=int, default=None,
        help="max_tokens ceiling, also the default when a request gives none (default: the "
        "context length)",
    )  # fmt: skip
    limits.add_argument(
        "--max-choices", type=int, default=Limits().max_choices, help="prompts x n per request"
    )  # fmt: skip
    overload = p.add_argument_group("overload (503 + Retry-After when every decode worker is full)")
    overload.add_argument(
        "--max-inflight-per-worker", type=int, default=None,
        help="choices in flight per decode worker before it is saturated (default: twice its "
        "max_num_seqs)",
    )  # fmt: skip
    overload.add_argument("--retry-after-s", type=int, default=AdmissionConfig().retry_after_s)
    add_tls_args(p.add_argument_group("TLS of the gRPC channels to the workers"))
    p.add_argument(
        "--slo-ttft", type=float, default=None,
        help="seconds; with --slo-itl: count goodput (choices within both) in /metrics",
    )  # fmt: skip
    p.add_argument("--slo-itl", type=float, default=None, help="seconds, mean per choice")
    p.add_argument("--log-level", default="info")
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    model_dir = Path(args.model)
    return RouterConfig(
        model_dir=model_dir,
        served_model_name=args.served_model_name or model_dir.resolve().name,
        decode_workers=parse_workers(args.decode, Role.DECODE),
        prefill_workers=parse_workers(args.prefill, Role.PREFILL),
        mode=Mode(args.mode),
        host=args.host,
        port=args.port,
        policy=PolicyConfig(
            prefill_weight=args.prefill_weight,
            local_prefill_max_tokens=args.local_prefill_max_tokens,
            prefill_budget_s=args.prefill_budget_s,
        ),
        max_model_len=args.max_model_len,
        request_timeout_s=args.request_timeout_s,
        migration_limit=args.migration_limit,
        stream_interval=args.stream_interval,
        load_interval_s=args.load_interval_s,
        admin_key=args.admin_key or None,
        api_key=args.api_key or None,
        limits=Limits(
            max_body_bytes=args.max_body_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_output_tokens=args.max_output_tokens,
            max_choices=args.max_choices,
        ),
        admission=AdmissionConfig(
            max_inflight_per_worker=args.max_inflight_per_worker,
            retry_after_s=args.retry_after_s,
        ),
        grpc_tls=tls_from_args(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_ca),
        slo_ttft_s=args.slo_ttft,
        slo_itl_s=args.slo_itl,
    )


async def serve(config: RouterConfig, log_level: str) -> None:
    app = build_app(config, Tokenizer.from_dir(config.model_dir))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            access_log=False,  # one INFO line per request costs more than the routing
            http="httptools",  # C HTTP parser and a leaner send path than h11 (pure Python)
            timeout_keep_alive=30,
        )
    )
    serving = asyncio.create_task(server.serve())  # installs SIGINT/SIGTERM handlers
    while not server.started:
        if serving.done():  # could not bind, or the lifespan failed
            await serving
            raise SystemExit(f"router did not start on {config.host}:{config.port}")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]  # the bound one when --port 0
    # everything alive now lives as long as the process: out of the GC's full walks
    frozen = freeze_startup_heap()
    app.state.frontend.metrics.gc.install()
    set_young_threshold()  # young collections ~20x rarer (runtime/gc_pauses.py)
    log.info("froze %d startup objects out of garbage collection", frozen)
    # launchers (deploy/local_cluster.py) read `READY <name> <host:port>`
    print(f"READY router {config.host}:{port}", flush=True)
    await serving


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"router: {exc}", file=sys.stderr)
        return 2
    # uvloop: every streamed token is a wakeup, a gRPC read and a socket write on this loop;
    # uvloop does each for less CPU than asyncio's pure-Python loop (docs/benchmarks.md)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config, args.log_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
