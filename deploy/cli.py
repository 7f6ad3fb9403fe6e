"""`tandem` command line. Config is built here, once; everything below takes plain objects."""

from __future__ import annotations

import argparse
import sys

from engine.args import add_engine_args
from runtime.source_root import put_first_on_path

SERVING_NOTE = "serving commands (profile, plan) land with their issues"


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

    from deploy import serve_cli

    serve_cli.add_parsers(sub, _model_dir)  # serve, scale, planner

    from bench import goodput as bench_goodput
    from bench import serve as bench_serve

    bench = sub.add_parser("bench", help="benchmark clients")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bench_serve.add_parser(bench_sub)
    bench_goodput.add_parser(bench_sub)

    from deploy import plan, profile

    profile.add_parser(sub)
    plan.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    put_first_on_path()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
