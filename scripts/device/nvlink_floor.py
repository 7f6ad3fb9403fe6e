"""What the link itself gives for one request's KV (no NIXL): 376 MiB (3,000 tokens of
Llama-3.1-8B) from cuda:0 to cuda:1 as one copy_ in one process. Median of 10, CUDA events.
(Block-by-block copy_ from Python measures Python, ~40 us a call: not the link.)"""

from __future__ import annotations

import statistics

import torch

NBYTES = 188 * (2 << 20)
src = torch.randint(0, 255, (NBYTES,), dtype=torch.uint8, device="cuda:0")
dst = torch.zeros((NBYTES,), dtype=torch.uint8, device="cuda:1")
times = []
with torch.cuda.device("cuda:0"):
    for rep in range(11):
        torch.cuda.synchronize("cuda:1")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if rep:
            times.append(start.elapsed_time(end))
ms = statistics.median(times)
gbs = NBYTES / ms / 1e6
print(f"one copy_ of {NBYTES / 2**20:.0f} MiB cuda:0 -> cuda:1: {ms:.3f} ms, {gbs:.0f} GB/s")
