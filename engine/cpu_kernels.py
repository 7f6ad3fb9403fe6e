"""The engine's C kernels for CPU (cpu_kernels.c): built once per process, called via ctypes.

Why C and not torch ops: decode attention over the paged pool in torch needs a gather of every
row's whole context per layer per step (a copy as large as the KV it reads) followed by a
padded, masked SDPA; on the dev box that was ~75 % of a 64-row decode step. The kernel reads the
pool in place. No torch headers are involved, so the build takes about a second with the
system compiler (`$CC`, else `cc`), into a private temporary directory that is removed once the
library is loaded (the mapping outlives the file). A missing compiler is a clear error at engine
start, never a silent switch to another path.

Threads: every kernel runs on torch.get_num_threads() OpenMP threads, read at each call, in
torch's own OpenMP pool (the library links libgomp.so.1, which resolves to the copy torch loaded;
`library()` checks that only one is mapped). Before, only torch's GEMMs used the second thread and
the C kernels (decode attention: ~40 % of a 64-row decode step) ran on one.

Hazard: ctypes drops the GIL during a call; callers must keep every tensor whose pointer they
pass alive (and unmodified by other threads) until the call returns.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# -march=native: the library is built on the machine that runs it, every process start.
# -fno-trapping-math lets exp's float->int step vectorise (no FP traps are ever enabled; results
# are unchanged); -std=c11 keeps a*b+c unfused, as torch's separate ops round it.
# -fopenmp: the kernels' parallel regions (libgomp, shared with torch: see above).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-std=c11"]
_FLAGS += ["-fPIC", "-shared"]

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_int = ctypes.c_int


class CpuKernelBuildError(RuntimeError):
    """The C kernels could not be compiled (no compiler, or it failed)."""


@functools.cache
def library() -> ctypes.CDLL:
    """Compile and load cpu_kernels.c (once per process)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise CpuKernelBuildError(
            f"the CPU engine compiles its attention kernel with a C compiler, and {cc!r} is not "
            "on PATH: install gcc (e.g. `apt-get install gcc`) or set CC"
        )
    with tempfile.TemporaryDirectory(prefix="tandem-cpu-kernels-") as tmp:
        target = Path(tmp) / "cpu_kernels.so"
        proc = subprocess.run(
            [cc, *_FLAGS, "-o", str(target), str(_SOURCE), "-lm"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise CpuKernelBuildError(f"{cc} failed on {_SOURCE}:\n{proc.stderr[-4000:]}")
        lib = ctypes.CDLL(str(target))
    _check_one_openmp_runtime()
    fn = lib.paged_decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr]
    fn.argtypes += [_i64, _i64, _i64, _i64, _i64, ctypes.c_float, _int]
    fn = lib.paged_prefill_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr]
    fn.argtypes += [_i64, _i64, _i64, _i64, _i64, ctypes.c_float, _int]
    lib.rms_norm_f32.restype = None
    lib.rms_norm_f32.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, ctypes.c_float, _int]
    lib.add_rms_norm_f32.restype = None
    lib.add_rms_norm_f32.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float]
    lib.add_rms_norm_f32.argtypes += [_int]
    lib.silu_mul_f32.restype = None
    lib.silu_mul_f32.argtypes = [_ptr, _ptr, _i64, _i64, _int]
    lib.rope_f32.restype = None
    lib.rope_f32.argtypes = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]
    lib.kv_write_f32.restype = None
    lib.kv_write_f32.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr]
    lib.kv_write_f32.argtypes += [_i64, _i64, _int]
    return lib


def _check_one_openmp_runtime() -> None:
    """Hazard: a second libgomp in the process would bring a second thread pool whose spinning
    threads fight torch's for the same cores. The loader shares torch's copy by soname; check."""
    maps = Path("/proc/self/maps")
    if not maps.exists():  # not Linux: nothing to check
        return
    gomps = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    if len(gomps) > 1:
        raise CpuKernelBuildError(f"two OpenMP runtimes loaded: {sorted(gomps)}")


def _threads() -> int:
    return torch.get_num_threads()


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] fp32 (one query token per row); k/v_cache: one layer's views of the pool,
    [num_blocks, block_size, Hk, D] with contiguous (Hk, D); block_tables [B, W] int64 and
    seq_lens [B] int64 (context length including the new token) -> out [B, Hq, D], written
    into `out` when given (contiguous, q's shape)."""
    B, Hq, D = q.shape
    _, bs, Hk, Dk = k_cache.shape
    if Dk != D or Hq % Hk or k_cache.stride() != v_cache.stride():
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if k_cache.stride()[2:] != (D, 1):
        raise ValueError("k/v_cache must have contiguous [Hk, D] per token")
    for t in (q, k_cache, v_cache):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError("the CPU decode kernel takes float32 CPU tensors")
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    if tables.shape[0] != B or lens.shape != (B,):
        raise ValueError("block_tables and seq_lens need one row per query")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor shaped like q")
    rc = library().paged_decode_attention_f32(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        tables.data_ptr(),
        tables.shape[1],
        lens.data_ptr(),
        out.data_ptr(),
        B,
        Hq,
        Hk,
        D,
        bs,
        scale,
        _threads(),
    )
    if rc != 0:
        raise MemoryError("paged_decode_attention_f32: scratch allocation failed")
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    bounds: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Causal attention of prefill spans over the pool in place (their K/V already written).

    q [N, Hq, D] fp32 (tokens may be strided, each token's [Hq, D] contiguous); k/v_cache as for
    paged_decode_attention; tables [S, W] int64, span s's block table (padded); bounds [S, 3]
    int64, span s = (first token in q, its tokens, context before it). Writes the spans' rows of
    `out` [N, Hq, D] (contiguous) and nothing else."""
    _, hq, d = q.shape
    _, bs, hk, dk = k_cache.shape
    if dk != d or hq % hk or k_cache.stride() != v_cache.stride():
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
    if k_cache.stride()[2:] != (d, 1) or q.stride()[1:] != (d, 1):
        raise ValueError("q and k/v_cache need each token's [H, D] contiguous")
    _check_f32(q, k_cache, v_cache, out)
    if out.shape != q.shape or not out.is_contiguous():
        raise ValueError("out must be a contiguous float32 tensor shaped like q")
    spans = bounds.shape[0]
    for t, shape in ((tables, (spans, tables.shape[-1])), (bounds, (spans, 3))):
        if t.dtype != torch.int64 or t.shape != shape or not t.is_contiguous():
            raise ValueError("tables [S, W] and bounds [S, 3] must be contiguous int64")
    # bounds and tables are trusted to lie inside q and the pool: the model runner builds them
    rc = library().paged_prefill_attention_f32(
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        tables.data_ptr(),
        tables.shape[1],
        bounds.data_ptr(),
        out.data_ptr(),
        spans,
        hq,
        hk,
        d,
        bs,
        scale,
        _threads(),
    )
    if rc != 0:
        raise MemoryError("paged_prefill_attention_f32: scratch allocation failed")


def _check_f32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError("the CPU kernels take float32 CPU tensors")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [N, H] (rows may be strided, elements contiguous), weight [H] -> new [N, H]."""
    _check_f32(x, weight)
    n, h = x.shape
    if x.stride(1) != 1 or weight.shape != (h,) or not weight.is_contiguous():
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.stride()}, weight {weight.shape}")
    out = torch.empty(n, h, dtype=x.dtype)
    library().rms_norm_f32(
        x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), n, h, eps, _threads()
    )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [N, H] contiguous, weight [H] -> (rms_norm(x + residual), x + residual), both
    new tensors; the same values as `s = x + residual; rms_norm(s, ...)` (one pass, no torch op)."""
    _check_f32(x, residual, weight)
    n, h = x.shape
    if residual.shape != (n, h) or weight.shape != (h,):
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)}, residual {tuple(residual.shape)}")
    if not (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()):
        raise ValueError("add_rms_norm: x, residual and weight must be contiguous")
    s = torch.empty(n, h, dtype=x.dtype)
    out = torch.empty(n, h, dtype=x.dtype)
    library().add_rms_norm_f32(
        x.data_ptr(),
        residual.data_ptr(),
        weight.data_ptr(),
        s.data_ptr(),
        out.data_ptr(),
        n,
        h,
        eps,
        _threads(),
    )
    return out, s


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [N, 2I] contiguous (gate columns first) -> new [N, I] = silu(gate) * up."""
    _check_f32(gate_up)
    n, two_i = gate_up.shape
    if two_i % 2 or not gate_up.is_contiguous():
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} must be contiguous [N, 2I]")
    out = torch.empty(n, two_i // 2, dtype=gate_up.dtype)
    library().silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), n, two_i // 2, _threads())
    return out


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate x [N, H, D] in place (tokens may be strided; each token's [H, D] contiguous) by
    the rows `positions` [N] int64 of the cos/sin tables [max_positions, D]."""
    _check_f32(x, cos, sin)
    n, h, d = x.shape
    if x.stride()[1:] != (d, 1) or d % 2:
        raise ValueError(f"rope_: x {tuple(x.shape)} {x.stride()} needs contiguous [H, D], even D")
    tables_ok = cos.shape == sin.shape and cos.is_contiguous() and sin.is_contiguous()
    if not tables_ok or cos.shape[1] != d:
        raise ValueError("rope_: cos/sin must be contiguous [max_positions, D]")
    if positions.dtype != torch.int64 or positions.shape != (n,) or not positions.is_contiguous():
        raise ValueError("rope_: positions must be a contiguous [N] int64 tensor")
    # positions are trusted to be < max_positions: the scheduler bounds them by max_model_len
    library().rope_f32(
        x.data_ptr(),
        x.stride(0),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        n,
        h,
        d,
        _threads(),
    )


def kv_write(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_blocks: torch.Tensor,
    slot_offsets: torch.Tensor,
) -> None:
    """k/v [N, Hk, D] (tokens may be strided, each token's [Hk, D] contiguous) into one layer's
    pool views [num_blocks, block_size, Hk, D] at (slot_blocks[n], slot_offsets[n]), int64 [N].
    Same effect as `k_cache[slot_blocks, slot_offsets] = k` (and v)."""
    _check_f32(k, v, k_cache, v_cache)
    n, hk, d = k.shape
    if v.shape != k.shape or k_cache.shape[2:] != (hk, d) or k_cache.stride() != v_cache.stride():
        raise ValueError(f"kv_write: k {tuple(k.shape)}, k_cache {tuple(k_cache.shape)}")
    for t in (k, v, k_cache):
        if t.stride()[-2:] != (d, 1):
            raise ValueError("kv_write: every token's [Hk, D] must be contiguous")
    for idx in (slot_blocks, slot_offsets):
        if idx.dtype != torch.int64 or idx.shape != (n,) or not idx.is_contiguous():
            raise ValueError("kv_write: slot_blocks/slot_offsets must be contiguous [N] int64")
    # slots are trusted to lie inside the pool: the block manager hands them out
    library().kv_write_f32(
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        slot_blocks.data_ptr(),
        slot_offsets.data_ptr(),
        n,
        hk * d,
        _threads(),
    )
