"""`tandem` command line. Config is built here, once; everything below takes plain objects."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.args import add_engine_args

SERVING_NOTE = "serving commands (serve, scale, profile, plan) land with their issues"


def _model_dir(arg: str | None) -> str:
    if arg is not None:
        return arg
    from engine.default_model import default_cache_dir, ensure_default_model

    return str(ensure_default_model(default_cache_dir()))


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    from engine.args import engine_args_from

    llm = LLM.from_args(engine_args_from(args, _model_dir(args.model)))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )

    def answer(prompt: str) -> str:
        if args.chat:
            result = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            result = llm.generate(prompt, params)[0]
        return result.outputs[0].text

    if args.prompt is not None:
        print(answer(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    while True:  # one prompt per line until EOF
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            print(answer(line.rstrip("\n")), flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from deploy.local_cluster import ClusterConfig, LocalCluster

    worker_args = [
        "--dtype", args.dtype, "--device", args.device, "--load-format", args.load_format,
        "--block-size", str(args.block_size), "--kv-cache-gib", str(args.kv_cache_gib),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--max-num-seqs", str(args.max_num_seqs),
    ]  # fmt: skip
    if args.max_model_len is not None:
        worker_args += ["--max-model-len", str(args.max_model_len)]
    if args.num_blocks is not None:
        worker_args += ["--num-blocks", str(args.num_blocks)]
    if args.no_prefix_caching:
        worker_args.append("--no-prefix-caching")
    config = ClusterConfig(
        model_dir=Path(_model_dir(args.model)),
        host=args.host,
        port=args.port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        mode=args.mode,
        worker_args=tuple(worker_args),
    )
    print(
        f"starting {args.prefill} prefill + {args.decode} decode workers ({args.mode}) "
        f"for {config.model_dir} ...",
        file=sys.stderr,
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    with LocalCluster(config) as cluster:
        print(f"Tandem is serving {config.model_dir.name} at {cluster.url}/v1", flush=True)
        print(
            f"  curl {cluster.url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{config.model_dir.name}", "messages": """
            f"""[{{"role": "user", "content": "What is the capital of France?"}}]}}'""",
            flush=True,
        )
        try:
            while not stop and all(c.proc.poll() is None for c in cluster.children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        dead = [c.name for c in cluster.children if c.proc.poll() is not None]
        if dead:
            print(f"tandem: {', '.join(dead)} exited; stopping the cluster", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=f"Tandem ({SERVING_NOTE}).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="offline generation on this machine")
    add_engine_args(gen)
    gen.add_argument("--prompt", help="prompt text; without it, read one prompt per stdin line")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve the OpenAI API: router + prefill/decode workers")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--prefill", type=int, default=1, help="prefill workers")
    serve.add_argument("--decode", type=int, default=1, help="decode workers")
    serve.add_argument("--mode", default="disagg", choices=["disagg", "collocated", "auto"])
    serve.set_defaults(func=cmd_serve)

    from bench import serve as bench_serve

    bench = sub.add_parser("bench", help="benchmark clients")
    bench_serve.add_parser(bench.add_subparsers(dest="bench_command", required=True))

    from deploy import plan, profile

    profile.add_parser(sub)
    plan.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
