"""`tandem serve` and `tandem scale`: flags, and the wiring from flags to launcher and
controller (done here, once; below this everything takes plain objects)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.args import add_engine_args
from runtime.tls import add_tls_args

if TYPE_CHECKING:
    from deploy.admin_client import AdminClient
    from deploy.app import ServeConfig
    from deploy.launcher import Launcher

ADMIN_KEY_HELP = "bearer token of the router's /admin API (default: $TANDEM_ADMIN_KEY)"


def add_parsers(sub: Any, model_dir: Any) -> None:
    """Add `serve` and `scale` to the `tandem` subcommands; `model_dir(arg)` resolves --model."""
    serve = sub.add_parser("serve", help="serve the OpenAI API: router + prefill/decode workers")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="the router's bind address")
    serve.add_argument("--port", type=int, default=8000, help="the router's port (0: any)")
    serve.add_argument("--prefill", type=int, default=1, help="prefill workers at start")
    serve.add_argument("--decode", type=int, default=1, help="decode workers at start")
    serve.add_argument("--mode", default="disagg", choices=["disagg", "collocated", "auto"])
    for pool in ("prefill", "decode"):
        serve.add_argument(
            f"--{pool}-tensor-parallel-size", type=int, default=None,
            help=f"ranks of each {pool} worker (default: --tensor-parallel-size); on GPUs one "
            "GPU per rank, one Ray bundle per worker",
        )  # fmt: skip
    serve.add_argument(
        "--launcher", default="ray", choices=["ray", "local"],
        help="ray: workers are Ray actors placed on GPUs (restarted on a crash); "
        "local: plain local processes",
    )  # fmt: skip
    serve.add_argument("--admin-key", default=os.environ.get("TANDEM_ADMIN_KEY"),
                       help=ADMIN_KEY_HELP)  # fmt: skip
    serve.add_argument(
        "--api-key", default=os.environ.get("TANDEM_API_KEY"),
        help="bearer token of the router's /v1/* (default: $TANDEM_API_KEY; unset: no auth)",
    )  # fmt: skip
    serve.add_argument(
        "--max-inflight-per-worker", type=int, default=None,
        help="router: choices per decode worker before it sheds with 503 (default: 2 x "
        "--max-num-seqs)",
    )  # fmt: skip
    serve.add_argument(
        "--max-output-tokens", type=int, default=None,
        help="router: max_tokens ceiling and default (default: the context length)",
    )  # fmt: skip
    serve.add_argument(
        "--request-timeout-s", type=float, default=None,
        help="router: requests running longer end with 504 (default: the router's, 600)",
    )  # fmt: skip
    serve.add_argument(
        "--stream-interval", type=int, default=None,
        help="router: tokens per streamed SSE chunk (default: the router's, 1)",
    )  # fmt: skip
    serve.add_argument(
        "--local-prefill-max-tokens", type=int, default=None,
        help="router, --mode auto: prefill on an idle decode worker up to this many uncached "
        "tokens (default: the router's, 256)",
    )  # fmt: skip
    serve.add_argument(
        "--prefill-budget-s", type=float, default=None,
        help="router, --mode auto: a long prompt goes to a prefill worker while its estimated "
        "prefill time there is at most this (default: the router's, 0.5)",
    )  # fmt: skip
    add_tls_args(serve.add_argument_group("TLS of every gRPC server and channel"))
    serve.add_argument(
        "--worker-host", default=None,
        help="workers' bind address (default: their node's address; 127.0.0.1 locally)",
    )  # fmt: skip
    serve.add_argument("--start-timeout-s", type=float, default=300.0)
    ray_group = serve.add_argument_group("ray launcher")
    ray_group.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (auto, host:port); default $RAY_ADDRESS (set by `ray job "
        "submit`), else an embedded single-node cluster on 127.0.0.1",
    )  # fmt: skip
    ray_group.add_argument(
        "--num-gpus-per-worker", type=int, default=None,
        help="GPUs per worker, one multi-GPU bundle (its tensor-parallel size); default: 1 "
        "when the cluster has GPUs, else 0",
    )  # fmt: skip
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0)
    for pool in ("prefill", "decode"):
        ray_group.add_argument(
            f"--{pool}-placement", default="pack", choices=["pack", "spread"],
            help=f"{pool} workers: on as few nodes as possible, or across nodes",
        )  # fmt: skip
    ray_group.add_argument(
        "--max-restarts", type=int, default=5, help="Ray restarts of a crashed worker (-1: any)"
    )
    ray_group.add_argument(
        "--ray-num-gpus", type=int, default=None,
        help="embedded cluster only: GPUs to declare (default: detected; more fakes GPUs)",
    )  # fmt: skip
    ray_group.add_argument(
        "--ray-num-cpus", type=int, default=None,
        help="embedded cluster only: logical CPUs (default: detected)",
    )  # fmt: skip
    serve.set_defaults(func=cmd_serve, model_dir=model_dir)

    scale = sub.add_parser("scale", help="resize the prefill and decode pools of a running server")
    scale.add_argument("--url", default="http://127.0.0.1:8000", help="the router")
    scale.add_argument("--prefill", type=int, default=None, help="prefill workers (default: keep)")
    scale.add_argument("--decode", type=int, default=None, help="decode workers (default: keep)")
    scale.add_argument("--admin-key", default=os.environ.get("TANDEM_ADMIN_KEY"),
                       help=ADMIN_KEY_HELP)  # fmt: skip
    scale.add_argument("--reason", default="tandem scale")
    scale.add_argument("--no-wait", action="store_true", help="return once the target is set")
    scale.add_argument("--timeout-s", type=float, default=600.0)
    scale.set_defaults(func=cmd_scale)

    planner = sub.add_parser(
        "planner", help="size the pools to an SLO from the router's load and a capacity profile"
    )
    planner.add_argument("--url", default="http://127.0.0.1:8000", help="the router")
    planner.add_argument("--profile", required=True, help="profile.json from `tandem profile`")
    planner.add_argument("--slo-ttft", type=float, required=True, help="mean TTFT target, s")
    planner.add_argument("--slo-itl", type=float, required=True, help="mean ITL target, s")
    planner.add_argument("--gpu-budget", type=int, required=True, help="GPUs for both pools")
    planner.add_argument("--gpus-per-worker", type=int, default=1)
    planner.add_argument("--interval-s", type=float, default=30.0)
    planner.add_argument(
        "--scale-down-after", type=int, default=3,
        help="intervals in a row below the current size before a pool shrinks",
    )  # fmt: skip
    planner.add_argument("--min-prefill", type=int, default=1)
    planner.add_argument("--min-decode", type=int, default=1)
    planner.add_argument("--dry-run", action="store_true", help="print decisions, apply none")
    planner.add_argument("--metrics-host", default="127.0.0.1")
    planner.add_argument(
        "--metrics-port", type=int, default=9401,
        help="where tandem_planner_* metrics are served (0: any free port, -1: none)",
    )  # fmt: skip
    planner.add_argument("--admin-key", default=os.environ.get("TANDEM_ADMIN_KEY"),
                         help=ADMIN_KEY_HELP)  # fmt: skip
    planner.set_defaults(func=cmd_planner)


def _worker_args(args: argparse.Namespace) -> tuple[str, ...]:
    out = [
        "--dtype", args.dtype, "--device", args.device, "--load-format", args.load_format,
        "--block-size", str(args.block_size), "--kv-cache-gib", str(args.kv_cache_gib),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-seqs", str(args.max_num_seqs), "--engine-seed", str(args.engine_seed),
        "--numerics", args.numerics,
    ]  # fmt: skip
    if args.max_model_len is not None:
        out += ["--max-model-len", str(args.max_model_len)]
    if args.num_blocks is not None:
        out += ["--num-blocks", str(args.num_blocks)]
    if args.no_prefix_caching:
        out.append("--no-prefix-caching")
    return tuple(out) + _tls_args(args)


def _tp(args: argparse.Namespace, pool: str) -> int:
    size: int | None = getattr(args, f"{pool}_tensor_parallel_size")
    return args.tensor_parallel_size if size is None else size


def _tls_args(args: argparse.Namespace) -> tuple[str, ...]:
    """--grpc-tls-* as absolute paths (every process gets the same files)."""
    out: list[str] = []
    for flag in ("cert", "key", "ca"):
        path = getattr(args, f"grpc_tls_{flag}")
        if path is not None:
            out += [f"--grpc-tls-{flag}", str(Path(path).resolve())]
    return tuple(out)


def _router_args(args: argparse.Namespace) -> tuple[str, ...]:
    out = list(_tls_args(args))
    if args.max_inflight_per_worker is not None:
        out += ["--max-inflight-per-worker", str(args.max_inflight_per_worker)]
    if args.max_output_tokens is not None:
        out += ["--max-output-tokens", str(args.max_output_tokens)]
    if args.request_timeout_s is not None:
        out += ["--request-timeout-s", str(args.request_timeout_s)]
    if args.stream_interval is not None:
        out += ["--stream-interval", str(args.stream_interval)]
    if args.local_prefill_max_tokens is not None:
        out += ["--local-prefill-max-tokens", str(args.local_prefill_max_tokens)]
    if args.prefill_budget_s is not None:
        out += ["--prefill-budget-s", str(args.prefill_budget_s)]
    return tuple(out)


def cmd_serve(args: argparse.Namespace) -> int:
    from deploy.app import ServeConfig, placement_table, run_serve
    from deploy.launcher import Launched

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per controller poll
    local_only = args.launcher == "local" or args.address is None
    env = {}
    if local_only:  # one machine: KV moves over loopback (UCX would pick every interface)
        env["UCX_NET_DEVICES"] = os.environ.get("UCX_NET_DEVICES", "lo")
    config = ServeConfig(
        model_dir=Path(args.model_dir(args.model)).resolve(),
        mode=args.mode,
        num_prefill=args.prefill,
        num_decode=args.decode,
        host=args.host,
        port=args.port,
        worker_host=args.worker_host,
        worker_args=_worker_args(args),
        prefill_tp=_tp(args, "prefill"),
        decode_tp=_tp(args, "decode"),
        tp_invariant_shards=args.tp_invariant_shards,
        router_args=_router_args(args),
        admin_key=args.admin_key or None,
        api_key=args.api_key or None,
        env=env,
        start_timeout_s=args.start_timeout_s,
    )
    embedded = args.launcher == "ray" and args.address is None
    launcher, where = _launcher(args, config)
    print(
        f"starting {args.prefill} prefill + {args.decode} decode workers ({args.mode}) on "
        f"{where} for {config.model_dir} ...",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()  # a graceful stop; a second signal gets the default action
        again = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, again)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def on_ready(url: str, launched: list[Launched]) -> None:
        name = config.model_dir.name
        print(f"Tandem is serving {name} at {url}/v1", flush=True)
        print(placement_table(launched), flush=True)
        print(
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{name}", "messages": """
            f"""[{{"role": "user", "content": "What is the capital of France?"}}]}}'""",
            flush=True,
        )
        print(f"  tandem scale --url {url} --prefill N --decode M", flush=True)

    try:
        return run_serve(config, launcher, stop, on_ready)
    finally:
        if embedded:
            import ray

            ray.shutdown()


def _launcher(args: argparse.Namespace, config: ServeConfig) -> tuple[Launcher, str]:
    """The launcher the flags ask for, connected; and a phrase saying where it runs things."""
    from deploy.app import router_spec, worker_spec

    if args.launcher == "local":
        from deploy.local_launcher import ProcessLauncher

        return ProcessLauncher(router_spec(config), partial(worker_spec, config)), "local processes"
    if args.address is None:
        # Ray reads this at import: "local-only Ray", every Ray process on 127.0.0.1
        # (otherwise it binds and dials the host's first interface even for one node)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private cluster: no reports
    from deploy.placement import PoolPlacement, Strategy
    from deploy.ray_launcher import RayClusterConfig, RayLauncher, cluster_gpus, connect
    from router.config import Role

    connect(RayClusterConfig(args.address, args.ray_num_cpus, args.ray_num_gpus))
    gpus = args.num_gpus_per_worker
    if gpus is None:  # nothing assumes CPU: a GPU per rank wherever there are GPUs
        gpus = 1 if cluster_gpus() > 0 else 0
    placement = {}
    for role in Role:
        tp = config.tensor_parallel(role)
        if gpus and args.num_gpus_per_worker is not None and tp > 1 and gpus != tp:
            raise SystemExit(
                f"tandem: --num-gpus-per-worker {gpus} but {role.value} workers have "
                f"tensor-parallel size {tp} (one GPU per rank)"
            )
        placement[role] = PoolPlacement(
            gpus * tp if args.num_gpus_per_worker is None else gpus,
            args.cpus_per_worker,
            Strategy(getattr(args, f"{role.value}_placement")),
        )
    launcher = RayLauncher(
        router_spec(config),
        partial(worker_spec, config),
        placement,
        max_restarts=args.max_restarts,
    )
    where = (
        "an embedded Ray cluster" if args.address is None else f"the Ray cluster at {args.address}"
    )
    per = ", ".join(f"{role.value} {placement[role].num_gpus}" for role in Role)
    return launcher, f"{where}, GPUs per worker: {per}"


def cmd_scale(args: argparse.Namespace) -> int:
    import httpx

    from deploy.admin_client import AdminClient, AdminError

    admin = AdminClient(args.url, args.admin_key or None)
    try:
        return _scale(args, admin)
    except (AdminError, httpx.HTTPError) as exc:
        print(f"tandem scale: {args.url}: {exc}", file=sys.stderr)
        return 1
    finally:
        admin.close()


def _scale(args: argparse.Namespace, admin: AdminClient) -> int:
    current = admin.scale_status().target
    if current is None and (args.prefill is None or args.decode is None):
        raise ValueError("the router has no target yet: give both --prefill and --decode")
    prefill = args.prefill if args.prefill is not None or current is None else current.prefill
    decode = args.decode if args.decode is not None or current is None else current.decode
    status = admin.set_scale(prefill, decode, args.reason)
    print(f"target: {prefill} prefill, {decode} decode (generation {status.generation})")
    if args.no_wait:
        return 0
    deadline = time.monotonic() + args.timeout_s
    while not status.settled():
        if time.monotonic() > deadline:
            print(f"tandem scale: not settled after {args.timeout_s:.0f} s: {status.pools}",
                  file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.5)
        status = admin.scale_status()
    ready = ", ".join(f"{role.value} {p.ready} ready" for role, p in status.pools.items())
    print(f"settled: {ready}")
    return 0


def cmd_planner(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from deploy.admin_client import AdminClient
    from deploy.capacity import SLO, Profile, Workload, recommend
    from deploy.planner import PlannerConfig, PlannerLoop, PlannerMetrics, Sizing

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    profile = Profile.load(args.profile)
    slo = SLO(args.slo_ttft, args.slo_itl)
    config = PlannerConfig(
        slo_ttft_s=args.slo_ttft,
        slo_itl_s=args.slo_itl,
        gpu_budget=args.gpu_budget,
        gpus_per_prefill=args.gpus_per_worker,
        gpus_per_decode=args.gpus_per_worker,
        min_prefill=args.min_prefill,
        min_decode=args.min_decode,
        scale_down_after=args.scale_down_after,
    )
    if not args.interval_s > 0:
        raise ValueError(f"--interval-s must be > 0, got {args.interval_s}")

    def sizing(rate_rps: float, isl: float, osl: float, max_workers: int) -> Sizing:
        return recommend(profile, Workload(rate_rps, isl, osl), slo, gpu_budget=max_workers)

    metrics = PlannerMetrics(config, args.dry_run)
    if args.metrics_port >= 0:
        server, _ = start_http_server(
            args.metrics_port, addr=args.metrics_host, registry=metrics.registry
        )
        print(f"planner metrics at http://{args.metrics_host}:{server.server_port}/metrics",
              flush=True)  # fmt: skip
    admin = AdminClient(args.url, args.admin_key or None)
    loop = PlannerLoop(admin, config, sizing, metrics, dry_run=args.dry_run)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    mode = "dry run: nothing is applied" if args.dry_run else "applying through /admin/scale"
    print(
        f"planner: {args.url}, SLO ttft {args.slo_ttft} s itl {args.slo_itl} s, budget "
        f"{args.gpu_budget} GPUs, every {args.interval_s} s ({mode})",
        flush=True,
    )
    try:
        loop.run(stop, args.interval_s)
    finally:
        admin.close()
    return 0
