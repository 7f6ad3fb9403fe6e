"""Triton decode-attention tile sweep: achieved KV bandwidth per (block_n, warps, stages).

Llama-3.1-8B attention shape (32 q heads, 8 kv heads, head_dim 128, bf16, 16-token blocks, a
block-major pool of 2 layers so the strides are the engine's), random block order. Bytes = K and
V of every context token, read once. Prints a table and one JSON line.

    python -m bench.gpu_kernels
"""

from __future__ import annotations

import itertools
import json

import torch

from engine import triton_kernels as tk
from engine.gpu_attention import decode_num_splits

SHAPES = ((1, 1024), (64, 1536), (256, 1536))  # (batch, context)
HQ, HK, D, BS = 32, 8, 128, 16


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    y.copy_(x)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    copy_bw = 2 * (4 << 30) * 10 / (start.elapsed_time(end) / 1e3)
    del x, y
    rows = []
    for b, ctx in SHAPES:
        nb_seq = -(-ctx // BS)
        num_blocks = b * nb_seq + 1
        pool = torch.randn(num_blocks, 2, 2, BS, HK, D, device="cuda", dtype=torch.bfloat16)
        kc, vc = pool[:, 1, 0], pool[:, 1, 1]
        perm = torch.randperm(num_blocks - 1, device="cuda")[: b * nb_seq]
        tables = perm.view(b, nb_seq).to(torch.int32)
        lens = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16)
        out = torch.empty_like(q)
        nbytes = b * ctx * HK * D * 2 * 2
        base = decode_num_splits(b, HK, props.multi_processor_count)
        for bn, warps, stages, split_mul in itertools.product(
            (16, 32, 64), (2, 4, 8), (2, 3, 4), (1, 2) if b <= 8 else (1,)
        ):
            splits = min(64, base * split_mul)

            args = (q, kc, vc, tables, lens, out, splits, bn, warps, stages)

            def fn(args: tuple = args) -> None:  # type: ignore[type-arg]
                tk.decode_attention(*args)

            try:
                fn()
                torch.cuda.synchronize()
                start.record()
                for _ in range(20):
                    fn()
                end.record()
                torch.cuda.synchronize()
                t = start.elapsed_time(end) / 1e3 / 20
            except Exception as e:  # a tile that does not fit (shared memory): reported
                rows.append(
                    {
                        "batch": b,
                        "ctx": ctx,
                        "block_n": bn,
                        "warps": warps,
                        "stages": stages,
                        "splits": splits,
                        "error": str(e)[:120],
                    }
                )
                continue
            rows.append(
                {
                    "batch": b,
                    "ctx": ctx,
                    "block_n": bn,
                    "warps": warps,
                    "stages": stages,
                    "splits": splits,
                    "us": t * 1e6,
                    "gb_s": nbytes / t / 1e9,
                    "of_copy_bw": nbytes / t / copy_bw,
                }
            )
        del pool
    ok = [r for r in rows if "us" in r]
    for b, ctx in SHAPES:
        mine = sorted((r for r in ok if r["batch"] == b), key=lambda r: r["us"])
        print(f"batch {b} ctx {ctx}: best 5 of {len(mine)}")
        for r in mine[:5]:
            print(
                f"  bn {r['block_n']:>3} w {r['warps']} st {r['stages']} splits {r['splits']:>2}"
                f"  {r['us']:8.1f} us  {r['gb_s']:7.0f} GB/s  {r['of_copy_bw']:.2f} of copy"
            )
        default = [r for r in mine if (r["block_n"], r["warps"], r["stages"]) == (32, 4, 2)]
        if default:
            r = default[0]
            print(f"  default (32,4,2): {r['us']:.1f} us {r['of_copy_bw']:.2f} of copy")
    print("gpu_kernels " + json.dumps({"copy_bw": copy_bw, "rows": rows}))


if __name__ == "__main__":
    main()
