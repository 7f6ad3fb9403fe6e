"""Where a TP=2 engine departs from TP=1 in the TP-invariant mode, GEMM by GEMM (CUDA).

Runs bench.gpu_tp's greedy batch (Llama-3.1-8B shape, dummy weights, bf16) at TP=1 and TP=2,
both with --tp-invariant-shards 2 and eager steps (Python sees every call), and records in call
order a checksum of the raw bits of each virtual shard's column-parallel GEMM output, q and k
after RoPE, each row-parallel fp32 partial, each row-parallel layer's summed output and each
shard's attention output (o_proj's input). Prints the first record whose bits differ between the
two runs, how many differ, and whether the greedy ids match; then the same ids comparison with
CUDA graphs. Eager records sync once each: a 32-token run of the 8B shape took over 100 s on
two H200s; keep --max-tokens small.

    python -m bench.tp_invariant_check [--max-tokens 8]
    python -m bench.tp_invariant_check --cpu-model DIR   # rehearsal: gloo, CPU, no graphs
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.gpu_tp import _args
from engine import LLM, SamplingParams
from engine.args import EngineArgs
from engine.gpu_runner import GpuModelRunner
from engine.model_runner import ModelRunner
from engine.tp_invariant import InvariantColumnLinear, InvariantRowLinear, ShardedRotary

PROMPTS = (17, 64, 130, 300)
Record = tuple[str, int, str, int, int]  # module, call, kind, virtual shard (-1: all), checksum


def _bits(t: torch.Tensor) -> int:
    """A checksum of the raw bits (equal tensors: equal sums; a flipped bit: almost surely not)."""
    flat = t.contiguous().view(-1)
    ints = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32).to(torch.int64)
    weights = torch.arange(ints.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
    return int((ints * weights).sum().item())


def _instrument(model: torch.nn.Module, records: list[Record]) -> None:
    # the rank's first virtual shard (ShardedRotary does not keep it): any column layer's
    rank_first = [next(m.first for m in model.modules() if isinstance(m, InvariantColumnLinear))]
    calls: dict[str, int] = {}  # module -> calls completed (a "*-call" record ends a call)

    def add(name: str, kind: str, shard: int, t: torch.Tensor) -> None:
        records.append((name, calls.get(name, 0), kind, shard, _bits(t)))
        if kind.endswith("-call"):
            calls[name] = calls.get(name, 0) + 1

    for name, mod in model.named_modules():
        if isinstance(mod, InvariantColumnLinear):
            col = mod
            original = col.shard_outputs

            def shard_outputs(
                x: torch.Tensor, name: str = name, col: InvariantColumnLinear = col,
                original: Any = original,
            ) -> list[torch.Tensor]:  # fmt: skip
                outs: list[torch.Tensor] = original(x)
                for j, o in enumerate(outs):
                    add(name, "col", col.first + j, o)
                add(name, "col-call", -1, x)  # the (replicated) input
                return outs

            col.shard_outputs = shard_outputs  # type: ignore[method-assign]
        elif isinstance(mod, ShardedRotary):
            rope = mod
            original_r = rope.shard_outputs
            first = rank_first[0]

            def rope_outputs(
                positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, name: str = name,
                original: Any = original_r, first: int = first,
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
                outs: list[tuple[torch.Tensor, torch.Tensor]] = original(positions, q, k)
                for j, (qj, kj) in enumerate(outs):
                    add(name, "rope-q", first + j, qj)
                    add(name, "rope-k", first + j, kj)
                add(name, "rope-call", -1, positions)
                return outs

            rope.shard_outputs = rope_outputs  # type: ignore[method-assign]
        elif isinstance(mod, InvariantRowLinear):
            row = mod
            original_p = row.local_partials

            def local_partials(
                x: torch.Tensor, name: str = name, row: InvariantRowLinear = row,
                original: Any = original_p,
            ) -> torch.Tensor:  # fmt: skip
                per = row.per
                for j in range(row.count):
                    add(name, "attn-in", row.first + j, x[:, j * per : (j + 1) * per])
                local: torch.Tensor = original(x)
                for j in range(row.count):
                    add(name, "partial", row.first + j, local[j])
                return local

            row.local_partials = local_partials  # type: ignore[method-assign]
            row.register_forward_hook(lambda m, i, out, name=name: add(name, "row-call", -1, out))


def _cpu_args(model: str, tp: int) -> EngineArgs:
    return EngineArgs(
        model=model, device="cpu", dtype="bfloat16", load_format="dummy", num_threads=1,
        kv_cache_gib=0.05, max_model_len=512, max_num_seqs=8, tensor_parallel_size=tp,
        tp_invariant_shards=2,
    )  # fmt: skip


def _rank_main(rank: int, tp: int, eager: bool, max_tokens: int, cpu_model: str, out: str) -> None:
    if tp > 1:
        kwargs: dict[str, Any] = {}
        if not cpu_model:
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device(f"cuda:{rank}")
        dist.init_process_group(
            "gloo" if cpu_model else "nccl",
            init_method=f"file://{out}.init",
            rank=rank,
            world_size=tp,
            **kwargs,
        )
    records: list[Record] = []
    try:
        args = _cpu_args(cpu_model, tp) if cpu_model else _args(tp, rank, "bfloat16", eager, 2)
        runner: ModelRunner
        if rank == 0:
            llm = LLM.from_args(args, tokenizer=False)
            runner = llm.engine.runner
        else:
            runner = (ModelRunner if cpu_model else GpuModelRunner)(args.resolve())
        if eager:
            _instrument(runner.model, records)
        if rank == 0:
            import random

            rng = random.Random(7)
            prompts = [[rng.randrange(10, 30000) for _ in range(n)] for n in PROMPTS]
            greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            tokens = [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)]
            runner.stop_followers()
        else:
            runner.serve_followers()
            tokens = []
        Path(f"{out}.rank{rank}").write_text(json.dumps({"tokens": tokens, "records": records}))
    finally:
        if tp > 1:
            dist.destroy_process_group()


def run(tp: int, eager: bool, max_tokens: int, cpu_model: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        mp.start_processes(
            _rank_main,
            args=(tp, eager, max_tokens, cpu_model, out),
            nprocs=tp,
            start_method="spawn",
        )
        return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(tp)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--cpu-model", default="", help="a model dir: rehearse on CPU (gloo)")
    ns = p.parse_args()
    one = run(1, True, ns.max_tokens, ns.cpu_model)[0]
    two = run(2, True, ns.max_tokens, ns.cpu_model)
    by_key: dict[tuple[str, int, str, int], int] = {}
    for r, rank_out in enumerate(two):
        for name, call, kind, shard, bits in rank_out["records"]:
            if shard == -1 and r > 0:
                continue  # replicated outputs: rank 0's
            by_key[(name, call, kind, shard)] = bits
    differ = [rec for rec in one["records"] if by_key.get(tuple(rec[:4])) != rec[4]]
    print(f"eager: {len(one['records'])} records, {len(differ)} differ; first: {differ[:6]}")
    print(f"eager greedy ids identical: {one['tokens'] == two[0]['tokens']}")
    if not ns.cpu_model:
        g1 = run(1, False, 32, "")[0]["tokens"]
        g2 = run(2, False, 32, "")[0]["tokens"]
        same = sum(a == b for a, b in zip(g1, g2, strict=True))
        print(f"CUDA graphs greedy ids identical {same}/{len(g1)}")
    print("tp_invariant_check " + json.dumps({"differ": len(differ), "first": differ[:20]}))


if __name__ == "__main__":
    main()
