"""Small-M linear layers (engine/triton_gemv.py) against cuBLAS, Llama-3.1-8B shapes, one GPU.

For each projection (N, K) at M = 1: cuBLAS (F.linear) and every Triton tile of the sweep,
each timed as a CUDA graph of calls over enough distinct weight copies to be several times the
L2 (as in a model, where every layer's weights are new), so a kernel's ramp-up and tail count
as they do in a decode step. Bandwidth = weight bytes / time per call, against the copy
bandwidth measured in the same run. Then, at the best tile: the fused variants the model uses
(norm prologue, SiLU prologue, residual epilogue) and M = 2, 4, 8. Prints a table and one JSON
line ("gpu_gemv ..." prefix).

    python -m bench.gpu_gemv
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from engine import triton_fused, triton_gemv

SHAPES = {  # name: (N, K), Llama-3.1-8B
    "qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
TILES = [
    (bn, bk, w)
    for bn, bk, w in itertools.product((2, 4, 8, 16), (512, 1024, 2048), (4, 8))
    if bn * bk <= 16384
]


def copy_bandwidth() -> float:
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = _graph_time([lambda: y.copy_(x)], reps=10)
    return 2 * (4 << 30) / t


def _graph_time(calls: list[Callable[[], Any]], reps: int = 20) -> float:
    """Seconds per call: the calls captured back to back in one graph, replayed `reps` times."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps / len(calls)


def _time_per_weight(ws: list[torch.Tensor], fn: Callable[[torch.Tensor], Any]) -> float:
    """Seconds per fn(w), over all of ws in one graph."""
    return _graph_time([partial(fn, w) for w in ws])


def _check(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    if not err < 1e-2:
        raise AssertionError(f"{what}: relative error {err:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--l2-multiple-bytes", type=float, default=1.2e9)
    ns = p.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    bw = copy_bandwidth()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bw}
    print(f"device {out['device']}: copy {bw / 1e12:.2f} TB/s", flush=True)
    results: dict[str, Any] = {}
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, int(-(-ns.l2_multiple_bytes // nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=dt)
        ref = F.linear(x, ws[0])
        row: dict[str, Any] = {"N": n, "K": k, "copies": copies}
        t = _time_per_weight(ws, partial(F.linear, x))
        row["cublas"] = nbytes / t / bw
        best = (0.0, TILES[0])
        for tile in TILES:
            if n % tile[0]:
                continue
            _check(triton_gemv.linear(x, ws[0], tile=tile), ref, f"{name} {tile}")
            t = _time_per_weight(ws, partial(triton_gemv.linear, x, tile=tile))
            frac = nbytes / t / bw
            row[str(tile)] = frac
            if frac > best[0]:
                best = (frac, tile)
        row["best_tile"], row["best"] = best[1], best[0]
        tile = best[1]
        # the fused variants the model runs, at the best tile
        norm_w = 1 + 0.1 * torch.randn(k, device="cuda", dtype=dt)
        if name in ("qkv", "gate_up", "lm_head"):
            xn = triton_fused.rms_norm(x, norm_w, 1e-5)
            _check(
                triton_gemv.linear(x, ws[0], norm=(norm_w, 1e-5), tile=tile),
                F.linear(xn, ws[0]),
                name,
            )
            t = _time_per_weight(ws, partial(triton_gemv.linear, x, norm=(norm_w, 1e-5), tile=tile))
            row["fused_norm"] = nbytes / t / bw
        res = torch.randn(1, n, device="cuda", dtype=dt)
        if name == "o_proj":
            t = _time_per_weight(ws, partial(triton_gemv.linear, x, residual=res, tile=tile))
            row["fused_residual"] = nbytes / t / bw
        if name == "down":
            gu = torch.randn(1, 2 * k, device="cuda", dtype=dt)
            a = triton_fused.silu_and_mul(gu)
            _check(
                triton_gemv.linear(gu, ws[0], silu=True, residual=res, tile=tile),
                F.linear(a, ws[0]) + res,
                name,
            )
            t = _time_per_weight(
                ws, partial(triton_gemv.linear, gu, silu=True, residual=res, tile=tile)
            )
            row["fused_silu_residual"] = nbytes / t / bw
        for m in (2, 4, 8):
            xm = torch.randn(m, k, device="cuda", dtype=dt)
            _check(triton_gemv.linear(xm, ws[0], tile=tile), F.linear(xm, ws[0]), f"{name} M={m}")
            t_tr = _time_per_weight(ws, partial(triton_gemv.linear, xm, tile=tile))
            t_cb = _time_per_weight(ws, partial(F.linear, xm))
            row[f"M{m}"] = {"triton": nbytes / t_tr / bw, "cublas": nbytes / t_cb / bw}
        results[name] = row
        del ws
        torch.cuda.empty_cache()
        fused = {key: f"{v:.3f}" for key, v in row.items() if key.startswith("fused")}
        ms = " ".join(
            f"M{m} {row[f'M{m}']['triton']:.3f}/{row[f'M{m}']['cublas']:.3f}" for m in (2, 4, 8)
        )
        print(
            f"{name:8s} N={n:6d} K={k:5d}: cuBLAS {row['cublas']:.3f}, Triton best {best[0]:.3f} "
            f"at {best[1]} {fused} | triton/cuBLAS {ms}  (fractions of copy bandwidth)",
            flush=True,
        )
        sweep = " ".join(f"{t}:{row[str(t)]:.3f}" for t in TILES if str(t) in row)
        print(f"   sweep {sweep}", flush=True)
    out["shapes"] = results
    print("gpu_gemv " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
