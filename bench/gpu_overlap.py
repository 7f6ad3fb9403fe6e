"""Overlapped steps (issue 7: "scheduling of step N+1 overlaps the GPU running step N"), with
a tiny model where the host's work per step dominates.

A 4-layer Llama (hidden 256, vocab 32,000, dummy weights, bf16) on one GPU, decode batches of
1, 64 and 256 requests (128 in / 256 out, greedy, EOS ignored), once with the synchronous loop
and once overlapped, in the same process. Per batch: the median decode step of the engine,
the host's busy time in it (all but the wait for the GPU's tokens) and the GPU's own time (the
batch's CUDA graph replayed back to back). Synchronous, a step is about host + GPU; overlapped
it should be about max(host, GPU). Also checks both loops give the same tokens.
Prints a table and one JSON line ("gpu_overlap ...").

    python -m bench.gpu_overlap
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.gpu_decode import Bench, _cuda_time, _prompts
from engine import LLM, SamplingParams

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "eos_token_id": 2,
}


def run(model_dir: Path, overlap: bool, batches: list[int], isl: int, osl: int) -> dict[str, Any]:
    llm = LLM(
        str(model_dir),
        tokenizer=False,
        device="cuda",
        dtype="bfloat16",
        load_format="dummy",
        kv_cache_gib=4.0,
        max_model_len=1024,
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
        async_scheduling=overlap,
    )
    bench = Bench(llm, 1.0)
    graphs = getattr(llm.engine.runner, "graphs", None)
    assert graphs is not None
    greedy = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    check = [o.outputs[0].token_ids for o in llm.generate(_prompts(8, 50, 32000, 5), greedy)]
    rows = []
    for b in batches:
        r = bench.batch(b, isl, osl)
        replay = _cuda_time(graphs.graph(graphs.bucket_for(b)).replay, 100)
        rows.append(
            {
                "batch": b,
                "median_step_s": r["median_decode_step_s"],
                "median_host_busy_s": r["median_host_busy_s"],
                "median_wait_s": r["median_wait_s"],
                "gpu_replay_s": replay,
                "decode_tok_s": r["decode_tok_s"],
            }
        )
    return {"overlap": overlap, "rows": rows, "check_tokens": check}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=256)
    ns = p.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "model": TINY}
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(TINY))
        sync = run(Path(d), False, batches, ns.isl, ns.osl)
        over = run(Path(d), True, batches, ns.isl, ns.osl)
    out["sync"], out["overlapped"] = sync, over
    out["same_tokens"] = sync.pop("check_tokens") == over.pop("check_tokens")
    print(f"{out['device']}; same greedy tokens sync vs overlapped: {out['same_tokens']}")
    print("batch | GPU replay ms | sync: step ms (host busy) | overlapped: step ms (host busy)")
    for s, o in zip(sync["rows"], over["rows"], strict=True):
        print(
            f"{s['batch']:5d} | {s['gpu_replay_s'] * 1e3:6.3f} | "
            f"{s['median_step_s'] * 1e3:6.3f} ({s['median_host_busy_s'] * 1e3:.3f}) | "
            f"{o['median_step_s'] * 1e3:6.3f} ({o['median_host_busy_s'] * 1e3:.3f})",
            flush=True,
        )
    print("gpu_overlap " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
