"""Offline throughput: N prompts of exactly ISL random token ids, OSL new tokens each (EOS
ignored), through Tandem's `LLM.generate` or, with `--engine vllm`, vLLM's offline `LLM`.

Both engines get the same token ids (seeded, drawn from the tokenizer's normal vocabulary,
special tokens excluded; `prompts_sha256` in the output proves it). Only the measured
`generate` call is timed, after a warm-up on two other prompts (no shared prefixes, so the
prefix cache cannot help the measured run). vLLM is imported only in its branch: run that one
with the vLLM venv's python, from the repository root.

    .venv/bin/python -m bench.offline --model DIR --num-prompts 64 --input-len 256 \
        --output-len 128 --json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WARMUP_PROMPTS = 2
WARMUP_OUTPUT_LEN = 8

# (prompts, output_len, temperature, detokenize) -> output token count per prompt
Generate = Callable[[list[list[int]], int, float, bool], list[int]]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    engine: str  # "tandem" | "vllm"
    model: Path
    num_prompts: int
    input_len: int
    output_len: int
    dtype: str
    seed: int
    temperature: float  # 0: greedy
    detokenize: bool
    kv_cache_gib: float
    max_num_batched_tokens: int | None  # None: the engine's own default
    max_num_seqs: int | None
    torch_threads: int | None  # Tandem only: the engine's num_threads; None: its default


def normal_token_ids(model_dir: Path) -> tuple[list[int], str]:
    """Ids a prompt may use: the tokenizer's base vocabulary minus special/added tokens.
    Without a tokenizer.json, every id below config.json's vocab_size (said in the source)."""
    path = model_dir / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        special = set(tok.get_added_tokens_decoder())
        ids = [i for i in range(tok.get_vocab_size(with_added_tokens=False)) if i not in special]
        return ids, f"tokenizer.json base vocab minus {len(special)} added tokens"
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    return list(range(vocab)), "config.json vocab_size (no tokenizer.json)"


def make_prompts(ids: list[int], num: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(ids) for _ in range(length)] for _ in range(num)]


def prompts_digest(prompts: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def tandem_generate(cfg: BenchConfig) -> tuple[Generate, dict[str, Any]]:
    import torch

    from engine import LLM, SamplingParams

    extra: dict[str, Any] = {}
    if cfg.torch_threads is not None:
        extra["num_threads"] = cfg.torch_threads
    if cfg.max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    if cfg.max_num_seqs is not None:
        extra["max_num_seqs"] = cfg.max_num_seqs
    llm = LLM(
        str(cfg.model),
        tokenizer=cfg.detokenize,
        dtype=cfg.dtype,
        kv_cache_gib=cfg.kv_cache_gib,
        seed=cfg.seed,
        **extra,
    )
    ec = llm.engine.config

    def run(prompts: list[list[int]], osl: int, temperature: float, detok: bool) -> list[int]:
        sp = SamplingParams(max_tokens=osl, temperature=temperature, ignore_eos=True)
        return [len(r.outputs[0].token_ids) for r in llm.generate(prompts, sp)]

    info = {
        "engine_version": f"checkout {_git_head()}",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "max_num_batched_tokens": ec.max_num_batched_tokens,
        "max_num_seqs": ec.max_num_seqs,
        "num_kv_blocks": ec.num_blocks,
    }
    return run, info


def _git_head() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "engine"],
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("+dirty engine/" if dirty.stdout.strip() else "")


def vllm_generate(cfg: BenchConfig) -> tuple[Generate, dict[str, Any]]:
    import torch
    import vllm
    from vllm.inputs import TokensPrompt

    extra: dict[str, Any] = {}
    if cfg.max_num_batched_tokens is not None:
        extra["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    if cfg.max_num_seqs is not None:
        extra["max_num_seqs"] = cfg.max_num_seqs
    llm = vllm.LLM(model=str(cfg.model), dtype=cfg.dtype, seed=cfg.seed, **extra)

    def run(prompts: list[list[int]], osl: int, temperature: float, detok: bool) -> list[int]:
        sp = vllm.SamplingParams(
            max_tokens=osl, temperature=temperature, ignore_eos=True, detokenize=detok
        )
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outs = llm.generate(inputs, sp, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    sched = llm.llm_engine.vllm_config.scheduler_config
    info = {
        "engine_version": f"vllm {vllm.__version__}",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "threads_note": "torch_threads is this front-end process; the worker binds its own "
        "OpenMP threads (VLLM_CPU_OMP_THREADS_BIND; auto: all cores but one)",
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "max_num_seqs": sched.max_num_seqs,
    }
    return run, info


def machine() -> dict[str, Any]:
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        model = names[0] if names else model
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def tree_cpu_seconds() -> float | None:
    """User + system CPU seconds of this process and all its live descendants (vLLM runs its
    model in child processes), from Linux /proc; None where /proc is absent.

    On a shared machine wall time mostly measures the co-tenants' load; CPU seconds measure
    the work an engine did (still inflated somewhat by contention for caches and memory)."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return None
    ticks: dict[int, int] = {}
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry.name)
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
        children.setdefault(int(fields[1]), []).append(pid)  # ppid (field 4)
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    ids, id_source = normal_token_ids(cfg.model)
    prompts = make_prompts(ids, cfg.num_prompts, cfg.input_len, cfg.seed)
    warmup = make_prompts(ids, WARMUP_PROMPTS, cfg.input_len, cfg.seed + 1)
    t0 = time.perf_counter()
    generate, info = (tandem_generate if cfg.engine == "tandem" else vllm_generate)(cfg)
    startup_s = time.perf_counter() - t0
    generate(warmup, WARMUP_OUTPUT_LEN, cfg.temperature, cfg.detokenize)
    load_before = os.getloadavg()
    cpu0 = tree_cpu_seconds()
    t0 = time.perf_counter()
    counts = generate(prompts, cfg.output_len, cfg.temperature, cfg.detokenize)
    elapsed = time.perf_counter() - t0
    cpu1 = tree_cpu_seconds()
    load_after = os.getloadavg()
    cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    if counts != [cfg.output_len] * cfg.num_prompts:
        raise RuntimeError(
            f"expected {cfg.output_len} tokens per prompt, got {sorted(set(counts))}"
        )
    out_tokens = sum(counts)
    in_tokens = cfg.num_prompts * cfg.input_len
    return {
        "engine": cfg.engine,
        **info,
        "model": str(cfg.model),
        "dtype": cfg.dtype,
        "num_prompts": cfg.num_prompts,
        "input_len": cfg.input_len,
        "output_len": cfg.output_len,
        "temperature": cfg.temperature,
        "detokenize": cfg.detokenize,
        "seed": cfg.seed,
        "prompt_ids_from": id_source,
        "prompts_sha256": prompts_digest(prompts),
        "startup_s": round(startup_s, 2),
        "elapsed_s": round(elapsed, 3),
        "output_tokens": out_tokens,
        "output_tokens_per_s": round(out_tokens / elapsed, 2),
        "total_tokens_per_s": round((in_tokens + out_tokens) / elapsed, 2),
        "requests_per_s": round(cfg.num_prompts / elapsed, 3),
        "cpu_s": None if cpu_s is None else round(cpu_s, 2),
        "output_tokens_per_cpu_s": None if not cpu_s else round(out_tokens / cpu_s, 2),
        "loadavg_1m_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "machine": machine(),
    }


def table(r: dict[str, Any]) -> str:
    rows = [
        (
            "engine",
            f"{r['engine']} ({r['engine_version']}, torch {r['torch']}, "
            f"{r['torch_threads']} threads)",
        ),
        (
            "workload",
            f"{r['num_prompts']} prompts x {r['input_len']} in / {r['output_len']} out, "
            f"{r['dtype']}, temperature {r['temperature']}",
        ),
        ("elapsed", f"{r['elapsed_s']:.2f} s (startup {r['startup_s']:.1f} s, not counted)"),
        ("output tok/s", f"{r['output_tokens_per_s']:.1f}"),
        ("total tok/s", f"{r['total_tokens_per_s']:.1f}"),
        ("requests/s", f"{r['requests_per_s']:.3f}"),
        (
            "CPU s",
            f"{r['cpu_s']} (process tree, during generate; "
            f"{r['output_tokens_per_cpu_s']} output tok per CPU s)",
        ),
        ("load 1m", f"{r['loadavg_1m_before_after']} (before, after)"),
    ]
    return "\n".join(f"{k:>13}  {v}" for k, v in rows)


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, bool]:
    p = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("tandem", "vllm"), default="tandem")
    p.add_argument("--model", type=Path, required=True, help="local HF model directory")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--no-detokenize", action="store_true", help="token ids only, no text")
    p.add_argument(
        "--kv-cache-gib",
        type=float,
        default=2.0,
        help="Tandem's KV pool; for vLLM set VLLM_CPU_KVCACHE_SPACE instead",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="Tandem only: the engine's num_threads (vLLM binds its own OpenMP threads)",
    )
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    a = p.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not a.model.is_dir():
        p.error(f"--model {a.model} is not a directory")
    cfg = BenchConfig(
        engine=a.engine,
        model=a.model.resolve(),
        num_prompts=a.num_prompts,
        input_len=a.input_len,
        output_len=a.output_len,
        dtype=a.dtype,
        seed=a.seed,
        temperature=a.temperature,
        detokenize=not a.no_detokenize,
        kv_cache_gib=a.kv_cache_gib,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_num_seqs=a.max_num_seqs,
        torch_threads=a.torch_threads,
    )
    if cfg.engine == "vllm" and cfg.torch_threads is not None:
        p.error("--torch-threads is Tandem's; vLLM takes VLLM_CPU_OMP_THREADS_BIND")
    return cfg, a.json


def main(argv: list[str] | None = None) -> None:
    cfg, as_json = parse_args(argv)
    result = run_bench(cfg)
    print(table(result), flush=True)
    if as_json:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
