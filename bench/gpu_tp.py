"""Tensor parallelism (issue 7, acceptance 5): TP=2 vs TP=1 on one host's GPUs.

Llama-3.1-8B shape, dummy weights (the same on every rank: seeded per parameter, sharded
after init). For TP=1 and TP=2, in bf16 and fp32: greedy ids of 4 prompts x 32 new tokens
(batched); in bf16 also the batch-1 decode step at 1K context (median of 128 steps).
One process per rank (spawned here), NCCL for the model, gloo for the step plans.
--tp-invariant-shards S runs both sizes in the TP-invariant mode (engine/tp_invariant.py), where
TP=2 must give TP=1's greedy ids exactly in bf16 too. Prints a table and one JSON line
("gpu_tp ...").

    python -m bench.gpu_tp [--enforce-eager] [--dtypes bfloat16] [--tp-invariant-shards 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import LLM, SamplingParams
from engine.args import EngineArgs
from engine.gpu_runner import GpuModelRunner

MODEL = "engine/model_configs/llama-3.1-8b"
NEW_TOKENS = 32


def _args(tp: int, rank: int, dtype: str, eager: bool, shards: int | None) -> EngineArgs:
    return EngineArgs(
        model=MODEL,
        device=f"cuda:{rank}",
        dtype=dtype,
        load_format="dummy",
        kv_cache_gib=4.0,
        max_model_len=2048,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        enforce_eager=eager,
        tensor_parallel_size=tp,
        tp_invariant_shards=shards,
    )


def _leader(args: EngineArgs, with_latency: bool) -> dict[str, Any]:
    llm = LLM.from_args(args, tokenizer=False)
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 128000) for _ in range(n)] for n in (17, 64, 130, 300)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    out: dict[str, Any] = {
        "tokens": [r.outputs[0].token_ids for r in llm.generate(prompts, greedy)]
    }
    if with_latency:
        engine = llm.engine
        ctx = [rng.randrange(10, 128000) for _ in range(1024)]
        greedy_129 = SamplingParams(max_tokens=129, temperature=0.0, ignore_eos=True)
        engine.add_request("lat", ctx, greedy_129)
        times = []
        while engine.has_unfinished():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        out["batch1_step_s"] = statistics.median(times[1:])
    runner = llm.engine.runner
    assert isinstance(runner, GpuModelRunner)
    runner.stop_followers()
    return out


def _rank_main(
    rank: int, tp: int, dtype: str, eager: bool, shards: int | None, latency: bool, out: str
) -> None:
    torch.cuda.set_device(rank)
    if tp > 1:
        dist.init_process_group(
            "nccl",
            init_method=f"file://{out}.init",
            rank=rank,
            world_size=tp,
            device_id=torch.device(f"cuda:{rank}"),
        )
    try:
        if rank == 0:
            result = _leader(_args(tp, rank, dtype, eager, shards), latency)
            Path(out).write_text(json.dumps(result))
        else:
            GpuModelRunner(_args(tp, rank, dtype, eager, shards).resolve()).serve_followers()
    finally:
        if tp > 1:
            dist.destroy_process_group()


def run(tp: int, dtype: str, eager: bool, shards: int | None, latency: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        mp.start_processes(
            _rank_main,
            args=(tp, dtype, eager, shards, latency, out),
            nprocs=tp,
            start_method="spawn",
        )
        result: dict[str, Any] = json.loads(Path(out).read_text())
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument(
        "--tp-invariant-shards", type=int, default=None,
        help="run TP=1 and TP=2 in the TP-invariant mode with this many virtual shards",
    )  # fmt: skip
    ns = p.parse_args()
    shards = ns.tp_invariant_shards
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "gpus": torch.cuda.device_count(),
        "tp_invariant_shards": shards,
    }
    for dtype in ns.dtypes.split(","):
        latency = dtype == "bfloat16"
        one = run(1, dtype, ns.enforce_eager, shards, latency)
        two = run(2, dtype, ns.enforce_eager, shards, latency)
        same = [a == b for a, b in zip(one["tokens"], two["tokens"], strict=True)]
        first = [
            next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            for a, b in zip(one["tokens"], two["tokens"], strict=True)
        ]
        res[dtype] = {"tp1": one, "tp2": two, "identical": sum(same), "first_diff": first}
        mode = "default" if shards is None else f"invariant S={shards}"
        line = f"{dtype} ({mode}): greedy identical {sum(same)}/{len(same)} (first diffs {first})"
        if latency:
            line += (
                f"; batch-1 step @1K: TP1 {one['batch1_step_s'] * 1e3:.2f} ms, "
                f"TP2 {two['batch1_step_s'] * 1e3:.2f} ms"
            )
        print(line, flush=True)
    print("gpu_tp " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
