"""Small-M linear layers (engine/triton_gemv.py) against cuBLAS, Llama-3.1-8B shapes, one GPU.

For each projection (N, K) at M = 1: cuBLAS (F.linear) and every Triton tile of the sweep
(the plain GEMV, then the fused call the model makes: norm prologue for qkv, norm prologue +
SiLU-and-mul epilogue for gate_up, residual epilogue for o_proj and down),
each timed as a CUDA graph of calls over enough distinct weight copies to be several times the
L2 (as in a model, where every layer's weights are new), so a kernel's ramp-up and tail count
as they do in a decode step. Bandwidth = weight bytes / time per call, against the copy
bandwidth measured in the same run. The best plain tile again without programmatic dependent
launch (pdl=False). Then M = 2, 4, 8 at the engine's tile against cuBLAS.
Prints a table and one JSON line ("gpu_gemv ..." prefix).

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
# BLOCK_N, BLOCK_K, warps
TILES = [*itertools.product((2, 4, 8), (1024, 2048), (4, 8)), (2, 4096, 8), (4, 4096, 8)]


def copy_bandwidth() -> float:
    """Bytes/s read + written by a 4 GiB device-to-device copy, launched eagerly as
    bench/gpu_decode.py does. (Captured in a CUDA graph, the same copy_ becomes a memcpy node
    and read 2.71 TB/s where the eager one read 4.27 in the same call, 2026-11-22.)"""
    x = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * (4 << 30) * 10 / (start.elapsed_time(end) / 1e3)


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


def _model_call(
    name: str, x: torch.Tensor, k: int, n: int, dt: torch.dtype
) -> tuple[dict[str, Any], Callable[[torch.Tensor], torch.Tensor]]:
    """The fused variant DecoderLayer.forward_small runs for this projection, and its
    unfused reference (the kernels and F.linear it replaces)."""
    norm_w = 1 + 0.1 * torch.randn(k, device="cuda", dtype=dt)
    res = torch.randn(1, n, device="cuda", dtype=dt)
    if name == "qkv":
        kw: dict[str, Any] = {"norm": (norm_w, 1e-5)}
        return kw, lambda w: F.linear(triton_fused.rms_norm(x, norm_w, 1e-5), w)
    if name == "gate_up":
        kw = {"norm": (norm_w, 1e-5), "silu_mul": True}
        return kw, lambda w: triton_fused.silu_and_mul(
            F.linear(triton_fused.rms_norm(x, norm_w, 1e-5), w)
        )
    kw = {"residual": res}  # o_proj, down
    return kw, lambda w: F.linear(x, w) + res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--l2-multiple-bytes", type=float, default=1.2e9)
    ns = p.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    bw = max(copy_bandwidth() for _ in range(3))
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bw}
    print(f"device {out['device']}: copy {bw / 1e12:.2f} TB/s", flush=True)
    results: dict[str, Any] = {}
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, int(-(-ns.l2_multiple_bytes // nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=dt)
        row: dict[str, Any] = {"N": n, "K": k, "copies": copies}
        t = _time_per_weight(ws, partial(F.linear, x))
        row["cublas"] = nbytes / t / bw
        # plain GEMV, every tile
        sweep: dict[str, float] = {}
        for tile in TILES:
            _check(triton_gemv.linear(x, ws[0], tile=tile), F.linear(x, ws[0]), f"{name} {tile}")
            sweep[str(tile)] = (
                nbytes / _time_per_weight(ws, partial(triton_gemv.linear, x, tile=tile)) / bw
            )
        row["plain"] = sweep
        # the model's fused call, every tile, and the engine's tile (triton_gemv.tile_for)
        if name != "lm_head":
            kw, ref = _model_call(name, x, k, n // 2 if name == "gate_up" else n, dt)
            fused: dict[str, float] = {}
            for tile in TILES:
                _check(triton_gemv.linear(x, ws[0], tile=tile, **kw), ref(ws[0]), f"{name} fused")
                fused[str(tile)] = (
                    nbytes
                    / _time_per_weight(ws, partial(triton_gemv.linear, x, tile=tile, **kw))
                    / bw
                )
            row["fused"] = fused
            row["fused_engine_tile"] = (
                nbytes / _time_per_weight(ws, partial(triton_gemv.linear, x, **kw)) / bw
            )
        best = max(sweep, key=sweep.__getitem__)
        best_tile = TILES[[str(t) for t in TILES].index(best)]
        row["plain_best_no_pdl"] = (
            nbytes
            / _time_per_weight(ws, partial(triton_gemv.linear, x, tile=best_tile, pdl=False))
            / bw
        )
        for m in (2, 4, 8):
            xm = torch.randn(m, k, device="cuda", dtype=dt)
            _check(triton_gemv.linear(xm, ws[0]), F.linear(xm, ws[0]), f"{name} M={m}")
            t_tr = _time_per_weight(ws, partial(triton_gemv.linear, xm))
            t_cb = _time_per_weight(ws, partial(F.linear, xm))
            row[f"M{m}"] = {"triton": nbytes / t_tr / bw, "cublas": nbytes / t_cb / bw}
        results[name] = row
        del ws
        torch.cuda.empty_cache()
        ms = " ".join(
            f"M{m} {row[f'M{m}']['triton']:.2f}/{row[f'M{m}']['cublas']:.2f}" for m in (2, 4, 8)
        )
        line = f"{name:8s} N={n:6d} K={k:5d}: cuBLAS {row['cublas']:.3f}, plain best "
        line += f"{sweep[best]:.3f} at {best} (no PDL {row['plain_best_no_pdl']:.3f})"
        if "fused" in row:
            fb = max(row["fused"], key=row["fused"].__getitem__)
            line += f"; fused best {row['fused'][fb]:.3f} at {fb}, engine tile "
            line += f"{row['fused_engine_tile']:.3f}"
        print(f"{line} | triton/cuBLAS {ms}", flush=True)
        print("   plain " + " ".join(f"{t}:{v:.3f}" for t, v in sweep.items()), flush=True)
        if "fused" in row:
            print("   fused " + " ".join(f"{t}:{v:.3f}" for t, v in row["fused"].items()))
    out["shapes"] = results
    print("(fractions of the copy bandwidth)")
    print("gpu_gemv " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
