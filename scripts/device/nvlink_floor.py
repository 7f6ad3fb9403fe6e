"""What the link itself gives for one request's KV (no NIXL): 376 MiB from cuda:0 to cuda:1
in one process, as one copy and as 188 scattered 2 MiB block copies on 1, 2, 4 and 8 streams.
Median of 10, timed with CUDA events. Run with both GPUs visible."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

BLOCK, N, POOL = 2 << 20, 188, 252
src = torch.randint(0, 255, (POOL, BLOCK), dtype=torch.uint8, device="cuda:0")
dst = torch.zeros((POOL, BLOCK), dtype=torch.uint8, device="cuda:1")
g = torch.Generator().manual_seed(0)
s_ids = torch.randperm(POOL, generator=g)[:N].tolist()
d_ids = torch.randperm(POOL, generator=g)[:N].tolist()


def timed(fn: Callable[[list[torch.cuda.Stream]], None], streams: list[torch.cuda.Stream]) -> float:
    main = torch.cuda.current_stream("cuda:0")
    out = []
    for rep in range(11):
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for s in streams:
            s.wait_stream(main)
        fn(streams)
        for s in streams:
            main.wait_stream(s)
        end.record(main)
        end.synchronize()
        if rep:
            out.append(start.elapsed_time(end))
    return statistics.median(out)


def one_copy(streams: list[torch.cuda.Stream]) -> None:
    dst[:N].copy_(src[:N], non_blocking=True)


def scattered(streams: list[torch.cuda.Stream]) -> None:
    for i, (a, b) in enumerate(zip(s_ids, d_ids, strict=True)):
        with torch.cuda.stream(streams[i % len(streams)]):
            dst[b].copy_(src[a], non_blocking=True)


with torch.cuda.device("cuda:0"):
    ms = timed(one_copy, [])
    print(f"one copy of {N * BLOCK / 2**20:.0f} MiB: {ms:.3f} ms, {N * BLOCK / ms / 1e6:.0f} GB/s")
    for k in (1, 2, 4, 8):
        ms = timed(scattered, [torch.cuda.Stream("cuda:0") for _ in range(k)])
        print(
            f"{N} scattered 2 MiB copies on {k} stream(s): {ms:.3f} ms, "
            f"{N * BLOCK / ms / 1e6:.0f} GB/s"
        )
