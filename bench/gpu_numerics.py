"""Where Tandem's bf16 numerics part from transformers' (issue 7, acceptance 1: the analysis).

Three parts, one model directory (SmolLM2), one GPU:
  ops      every op of every layer run by Tandem on transformers' own inputs (captured by hooks
           on one sdpa bf16 forward of one text), compared bitwise with transformers' output:
           the fraction of elements that differ and the largest difference in bf16 ulps.
           Also transformers' own other attention paths (eager, each SDPA backend) on the same
           q/k/v, and Tandem's attention as 100-token chunks over the cached prefix.
  gemm     fused q/k/v and gate/up GEMMs vs the separate projections (Hypothesis B), and every
           GEMM's rows computed M rows at a time (M = 1, 4, 8, 64, 100) vs all rows at once
           (cuBLAS picks kernels by shape: is a row's result independent of M?).
  e2e      teacher-forced top-1 agreement, strict and tie-aware (bench/agreement.py), with
           transformers sdpa bf16 over the gpu_correctness texts: Tandem as built and Tandem
           with its fused pieces replaced by transformers' op sequence, with its attention
           replaced by torch SDPA called as transformers calls it (gathered from the pool),
           and both (monkeypatched here, not an engine mode), each as one chunk per text and
           as 100-token chunks; and
           transformers against itself (other SDPA backends, eager, chunked with a KV cache):
           the backend noise floor.
Prints tables; writes everything as JSON to --out.

    python -m bench.gpu_numerics --model DIR [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.agreement import bf16_ulp, logits_agreement, summary
from bench.gpu_correctness import CHUNK, TEXTS
from engine import LLM, SamplingParams
from engine.attention import paged_attention
from engine.gpu_runner import GpuModelRunner
from engine.layers import RMSNorm, RotaryEmbedding
from engine.models import llama
from engine.plan import ScheduledRow

GEMM_MS = (1, 4, 8, 64, 100)


def _diff(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Fraction of elements not bitwise equal, fraction more than 1 bf16 ulp apart (the ulp of
    the larger magnitude of the two), and the largest difference in those ulps."""
    ours, ref = ours.reshape(ref.shape).float(), ref.float()
    ulps = (ours - ref).abs() / bf16_ulp(torch.maximum(ours.abs(), ref.abs()))
    return {
        "frac_differ": float((ours != ref).float().mean()),
        "frac_over_1ulp": float((ulps > 1).float().mean()),
        "max_ulps": float(ulps.max()) if ulps.numel() else 0.0,
    }


def _merge(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-layer diffs -> mean fraction, worst ulps, layers with any difference."""
    return {
        "frac_differ": sum(r["frac_differ"] for r in rows) / len(rows),
        "frac_over_1ulp": sum(r["frac_over_1ulp"] for r in rows) / len(rows),
        "max_ulps": max(r["max_ulps"] for r in rows),
        "layers_differ": sum(r["frac_differ"] > 0 for r in rows),
        "layers": len(rows),
    }


# ---------------------------------------------------------------- transformers' internals


class _Capture:
    """Hooks on a transformers Llama: each layer's inputs and outputs of every op, and the
    post-RoPE q/k/v handed to the attention function."""

    def __init__(self, hf: Any) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.hf = hf
        self.t: dict[str, Any] = {}
        self.handles: list[Any] = []
        m = hf.model
        self._hook(m.embed_tokens, "embed", out=True)
        self._hook(m.norm, "final_norm", inp=True, out=True)
        self._hook(hf.lm_head, "logits", out=True)
        for i, layer in enumerate(m.layers):
            self._hook(layer, f"{i}.layer", inp=True, out=True)
            self._hook(layer.input_layernorm, f"{i}.in_norm", inp=True, out=True)
            a = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                self._hook(getattr(a, name), f"{i}.{name}", out=True)
            self._hook(a.o_proj, f"{i}.o_proj", inp=True, out=True)
            self._hook(layer.post_attention_layernorm, f"{i}.post_norm", inp=True, out=True)
            for name in ("gate_proj", "up_proj", "down_proj"):
                self._hook(getattr(layer.mlp, name), f"{i}.{name}", inp=True, out=True)
        self.funcs = ALL_ATTENTION_FUNCTIONS
        self.sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        captured = self.t
        sdpa = self.sdpa

        def attn(module: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> Any:
            i = module.layer_idx
            captured[f"{i}.q"], captured[f"{i}.k"], captured[f"{i}.v"] = q, k, v
            captured[f"{i}.mask"], captured[f"{i}.attn_kw"] = mask, kw
            return sdpa(module, q, k, v, mask, **kw)

        ALL_ATTENTION_FUNCTIONS["sdpa"] = attn

    def _hook(self, mod: Any, name: str, inp: bool = False, out: bool = False) -> None:
        t = self.t

        def fn(_m: Any, args: Any, kwargs: Any, output: Any) -> None:
            if inp:
                t[name + ".in"] = args[0] if args else kwargs["hidden_states"]
            if out:
                t[name + ".out"] = output[0] if isinstance(output, tuple) else output

        self.handles.append(mod.register_forward_hook(fn, with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.funcs["sdpa"] = self.sdpa


def _hf(model_dir: Path, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation=attn
    )
    return model.cuda().eval()


# ---------------------------------------------------------------- 1. ops on transformers' inputs


def _meta(runner: GpuModelRunner, n: int, start: int) -> Any:
    """Attention metadata of one prefill row: tokens [start, start + n) over a cached prefix."""
    bs = runner.config.block_size
    table = tuple(range(-(-(start + n) // bs)))
    row = ScheduledRow("op", (0,) * n, start, table, False, SamplingParams(), 0)
    return runner._prepare_eager((row,))[2]


@torch.inference_mode()
def ops(hf: Any, llm: LLM, ids: list[int]) -> dict[str, Any]:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    runner = llm.engine.runner
    assert isinstance(runner, GpuModelRunner)
    tm = runner.model
    cap = _Capture(hf)
    try:
        hf(torch.tensor([ids], device="cuda"))
    finally:
        cap.close()
    t = cap.t
    n = len(ids)
    pos = torch.arange(n, device="cuda")
    fused = llama.fused()
    res: dict[str, list[dict[str, float]]] = {}

    def add(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
        res.setdefault(name, []).append(_diff(ours, ref))

    def flat(x: torch.Tensor) -> torch.Tensor:  # [1, L, ...] -> [L, ...]
        return x[0]

    add("embedding", tm.embed_tokens(torch.tensor(ids, device="cuda")), flat(t["embed.out"]))
    hf_rope = hf.model.rotary_emb(t["embed.out"], pos[None])
    cos, sin = tm.layers[0].self_attn.rotary.cos, tm.layers[0].self_attn.rotary.sin
    add("rope cos table (bf16)", cos[:n].to(torch.bfloat16), flat(hf_rope[0]))
    add("rope sin table (bf16)", sin[:n].to(torch.bfloat16), flat(hf_rope[1]))
    sdpa_backends = _sdpa_backends()
    for i, (layer, hl) in enumerate(zip(tm.layers, hf.model.layers, strict=True)):
        a, ha = layer.self_attn, hl.self_attn
        x_in = flat(t[f"{i}.layer.in"])
        ref_norm = flat(t[f"{i}.in_norm.out"])
        w = layer.input_layernorm.weight
        eps = layer.input_layernorm.eps
        if i == 0:
            add("rms_norm (Triton)", fused.rms_norm(x_in, w, eps), ref_norm)
            add("rms_norm (torch path)", layer.input_layernorm._forward_torch(x_in), ref_norm)
        else:
            prev_sum, prev_out = flat(t[f"{i - 1}.post_norm.in"]), flat(t[f"{i - 1}.down_proj.out"])
            o, s = fused.add_rms_norm(prev_out, prev_sum, w, eps)
            add("add+rms_norm (Triton): sum", s, x_in)
            add("add+rms_norm (Triton): norm", o, ref_norm)
            add(
                "add+rms_norm (torch path): norm", layer.input_layernorm._forward_torch(s), ref_norm
            )
        # q/k/v: the fused GEMM vs the separate ones, on transformers' normed input
        qkv = a.qkv_proj(ref_norm)
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        wq, wk, wv = a.qkv_proj.weight.split([a.q_size, a.kv_size, a.kv_size], dim=0)
        add(
            "weights q|k|v equal",
            torch.cat([wq, wk, wv]),
            torch.cat([ha.q_proj.weight, ha.k_proj.weight, ha.v_proj.weight]),
        )
        for name, ours_fused, wpart in (("q", q, wq), ("k", k, wk), ("v", v, wv)):
            ref = flat(t[f"{i}.{name}_proj.out"])
            add(f"{name}_proj: fused qkv GEMM", ours_fused, ref)
            add(f"{name}_proj: separate GEMM, same weights", F.linear(ref_norm, wpart), ref)
        # RoPE on transformers' projections
        hq = flat(t[f"{i}.q_proj.out"]).view(n, a.num_heads, a.head_dim)
        hk = flat(t[f"{i}.k_proj.out"]).view(n, a.num_kv_heads, a.head_dim)
        ref_q = t[f"{i}.q"][0].transpose(0, 1)  # [L, Hq, D]
        ref_k = t[f"{i}.k"][0].transpose(0, 1)
        ref_v = t[f"{i}.v"][0].transpose(0, 1)
        rq, rk = fused.rope(pos, hq, cos, sin), fused.rope(pos, hk, cos, sin)
        add("rope q (Triton)", rq, ref_q)
        add("rope k (Triton)", rk, ref_k)
        c, s_ = cos[pos].unsqueeze(1).to(hq.dtype), sin[pos].unsqueeze(1).to(hq.dtype)
        add("rope q (torch path)", hq * c + llama_rotate(hq) * s_, ref_q)
        # attention on transformers' post-RoPE q/k/v
        ref_o = flat(t[f"{i}.o_proj.in"])  # [L, Hq*D]
        kv = runner.kv_cache.layer(i)
        qc, kc, vc = ref_q.contiguous(), ref_k.contiguous(), ref_v.contiguous()
        o_all = paged_attention(qc, kc, vc, kv[0], kv[1], _meta(runner, n, 0))
        add("attention: Tandem Triton, one chunk", o_all.reshape(n, -1), ref_o)
        chunks = []
        for st in range(0, n, CHUNK):
            e = min(n, st + CHUNK)
            m = _meta(runner, e - st, st)
            chunks.append(paged_attention(qc[st:e], kc[st:e], vc[st:e], kv[0], kv[1], m))
        o_chunks = torch.cat(chunks)
        add("attention: Tandem Triton, 100-token chunks", o_chunks.reshape(n, -1), ref_o)
        add("attention: Tandem chunked vs Tandem one chunk", o_chunks, o_all)
        q4, k4, v4 = t[f"{i}.q"], t[f"{i}.k"], t[f"{i}.v"]
        groups = q4.shape[1] // k4.shape[1]
        k4r, v4r = k4.repeat_interleave(groups, 1), v4.repeat_interleave(groups, 1)
        mask = torch.full((n, n), torch.finfo(q4.dtype).min, device="cuda").triu(1)
        eo, _ = eager_attention_forward(ha, q4, k4, v4, mask[None, None].to(q4.dtype), ha.scaling)
        # every torch SDPA backend on the same q/k/v (kv heads repeated: not all take GQA)
        add("attention: transformers eager", eo.reshape(n, -1), ref_o)
        for bname, backend in sdpa_backends:
            try:
                from torch.nn.attention import sdpa_kernel

                with sdpa_kernel(backend):
                    so = F.scaled_dot_product_attention(
                        q4, k4r, v4r, is_causal=True, scale=ha.scaling
                    )
                add(f"attention: torch SDPA {bname}", so.transpose(1, 2).reshape(n, -1), ref_o)
            except RuntimeError as e:
                res.setdefault(f"attention: torch SDPA {bname}", []).append(
                    {
                        "frac_differ": float("nan"),
                        "frac_over_1ulp": float("nan"),
                        "max_ulps": float("nan"),
                        "error": str(e)[:80],
                    }
                )
        # o_proj, residual + norm, MLP, each on transformers' inputs
        add("o_proj", a.o_proj(ref_o), flat(t[f"{i}.o_proj.out"]))
        pn = layer.post_attention_layernorm
        o, s = fused.add_rms_norm(flat(t[f"{i}.o_proj.out"]), x_in, pn.weight, pn.eps)
        add("add+rms_norm (Triton): sum", s, flat(t[f"{i}.post_norm.in"]))
        add("add+rms_norm (Triton): norm", o, flat(t[f"{i}.post_norm.out"]))
        add("add+rms_norm (torch path): norm", pn._forward_torch(s), flat(t[f"{i}.post_norm.out"]))
        h = flat(t[f"{i}.post_norm.out"])
        mlp = layer.mlp
        gu = mlp.gate_up_proj(h)
        g, u = gu.chunk(2, dim=-1)
        wg, wu = mlp.gate_up_proj.weight.chunk(2, dim=0)
        ref_g, ref_u = flat(t[f"{i}.gate_proj.out"]), flat(t[f"{i}.up_proj.out"])
        add("gate_proj: fused gate_up GEMM", g, ref_g)
        add("up_proj: fused gate_up GEMM", u, ref_u)
        add("gate_proj: separate GEMM, same weights", F.linear(h, wg), ref_g)
        add("up_proj: separate GEMM, same weights", F.linear(h, wu), ref_u)
        ref_act = flat(t[f"{i}.down_proj.in"])
        add("silu*up (Triton)", fused.silu_and_mul(torch.cat([ref_g, ref_u], -1)), ref_act)
        add("silu*up (torch path)", F.silu(ref_g) * ref_u, ref_act)
        add("down_proj", mlp.down_proj(ref_act), flat(t[f"{i}.down_proj.out"]))
    last = len(tm.layers) - 1
    fn = tm.norm
    o, s = fused.add_rms_norm(
        flat(t[f"{last}.down_proj.out"]), flat(t[f"{last}.post_norm.in"]), fn.weight, fn.eps
    )
    add("final add+rms_norm (Triton): sum", s, flat(t["final_norm.in"]))
    add("final add+rms_norm (Triton): norm", o, flat(t["final_norm.out"]))
    add(
        "lm_head (all rows at once)",
        tm.compute_logits(flat(t["final_norm.out"])),
        flat(t["logits.out"]),
    )
    return {k: _merge(v) for k, v in res.items()}


def llama_rotate(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _sdpa_backends() -> list[tuple[str, Any]]:
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
    return [(n, getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


# ---------------------------------------------------------------- 2. GEMMs: fusion and M


@torch.inference_mode()
def gemms(hf: Any, llm: LLM, ids: list[int]) -> dict[str, Any]:
    """On transformers' real activations (layer 0 and the final norm): fused vs separate at each
    M, and each GEMM's rows at M rows a launch vs all at once."""
    runner = llm.engine.runner
    tm = runner.model
    cap = _Capture(hf)
    try:
        hf(torch.tensor([ids], device="cuda"))
    finally:
        cap.close()
    t = cap.t
    a, mlp = tm.layers[0].self_attn, tm.layers[0].mlp
    x_attn = t["0.in_norm.out"][0]
    x_mlp = t["0.post_norm.out"][0]
    x_head = t["final_norm.out"][0]
    n = x_attn.shape[0]
    wq, wk, wv = a.qkv_proj.weight.split([a.q_size, a.kv_size, a.kv_size], dim=0)
    wg, wu = mlp.gate_up_proj.weight.chunk(2, dim=0)
    embed = tm.embed_tokens.weight
    out: dict[str, Any] = {}

    def rows(x: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
        return torch.cat([F.linear(x[s : s + m], w) for s in range(0, n, m)])

    for m in (*GEMM_MS, n):
        r: dict[str, Any] = {}
        qkv = rows(x_attn, a.qkv_proj.weight, m)
        sep = torch.cat([rows(x_attn, w, m) for w in (wq, wk, wv)], -1)
        r["qkv fused vs separate"] = _diff(qkv, sep)
        gu = rows(x_mlp, mlp.gate_up_proj.weight, m)
        sep = torch.cat([rows(x_mlp, w, m) for w in (wg, wu)], -1)
        r["gate_up fused vs separate"] = _diff(gu, sep)
        full = n
        r["q_proj M rows vs all rows"] = _diff(rows(x_attn, wq, m), rows(x_attn, wq, full))
        r["qkv fused M rows vs all rows"] = _diff(qkv, rows(x_attn, a.qkv_proj.weight, full))
        r["down_proj M rows vs all rows"] = _diff(
            rows(t["0.down_proj.in"][0], mlp.down_proj.weight, m),
            rows(t["0.down_proj.in"][0], mlp.down_proj.weight, full),
        )
        r["lm_head M rows vs all rows"] = _diff(rows(x_head, embed, m), rows(x_head, embed, full))
        out[f"M={m}"] = r
    return out


# ---------------------------------------------------------------- 3. end to end


@contextlib.contextmanager
def _patched(pairs: list[tuple[Any, str, Callable[..., Any]]]) -> Iterator[None]:
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in pairs]
    try:
        for obj, name, fn in pairs:
            setattr(obj, name, fn)
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def _attn_unfused(self: Any, x: Any, positions: Any, meta: Any, kv: Any) -> Any:
    """llama.Attention.forward with three GEMMs on row slices of the fused weight (transformers'
    separate projections, same weights)."""
    n = x.shape[0]
    w = self.qkv_proj.weight
    b = self.qkv_proj.bias
    sizes = [self.q_size, self.kv_size, self.kv_size]
    ws = w.split(sizes, dim=0)
    bs = b.split(sizes) if b is not None else (None, None, None)
    q, k, v = (F.linear(x, wi, bi) for wi, bi in zip(ws, bs, strict=True))
    q = q.view(n, self.num_heads, self.head_dim)
    k = k.view(n, self.num_kv_heads, self.head_dim)
    v = v.view(n, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None and self.k_norm is not None:
        q, k = self.q_norm(q), self.k_norm(k)
    q, k = self.rotary(positions, q, k)
    o = llama.paged_attention(q.contiguous(), k.contiguous(), v.contiguous(), kv[0], kv[1], meta)
    return self.o_proj(o.reshape(n, self.q_size))


# the row _tandem_logits is running: (tokens already cached, block table on the device)
_ROW: dict[str, Any] = {}


def _sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: Any, v_cache: Any, meta: Any
) -> torch.Tensor:
    """paged_attention's contract with transformers' attention call in place of the Triton
    kernels: the new K/V stored, the row's K/V gathered from the pool, then torch SDPA exactly
    as transformers calls it (no mask and is_causal over a fresh sequence; else a bool mask
    and repeated kv heads), letting torch pick the backend as it does for transformers."""
    from engine.gpu_attention import kernels

    kernels().store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    start, n, hk, d = _ROW["start"], q.shape[0], k.shape[1], k.shape[2]
    ctx = start + n
    kk = k_cache[_ROW["table"]].reshape(-1, hk, d)[:ctx].transpose(0, 1)[None]
    vv = v_cache[_ROW["table"]].reshape(-1, hk, d)[:ctx].transpose(0, 1)[None]
    qq = q.transpose(0, 1)[None]
    if start == 0 and n > 1:
        o = F.scaled_dot_product_attention(
            qq, kk, vv, is_causal=True, scale=d**-0.5, enable_gqa=True
        )
    else:
        groups = q.shape[1] // hk
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(diagonal=start)
        o = F.scaled_dot_product_attention(
            qq,
            kk.repeat_interleave(groups, 1),
            vv.repeat_interleave(groups, 1),
            attn_mask=mask[None, None],
            scale=d**-0.5,
        )
    return o[0].transpose(0, 1).contiguous()


def _mlp_unfused_torch(self: Any, x: Any) -> Any:
    wg, wu = self.gate_up_proj.weight.chunk(2, dim=0)
    return self.down_proj(F.silu(F.linear(x, wg)) * F.linear(x, wu))


def _mlp_torch(self: Any, x: Any) -> Any:
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(F.silu(gate) * up)


def _norm_torch(self: Any, x: Any) -> Any:
    return self._forward_torch(x)


def _add_norm_torch(self: Any, x: Any, residual: Any) -> Any:
    s = x + residual
    return self._forward_torch(s), s


def _rope_torch(self: Any, positions: Any, q: Any, k: Any) -> Any:
    cos = self.cos[positions].unsqueeze(1).to(q.dtype)
    sin = self.sin[positions].unsqueeze(1).to(q.dtype)
    return q * cos + llama_rotate(q) * sin, k * cos + llama_rotate(k) * sin


VARIANTS: dict[str, list[tuple[Any, str, Callable[..., Any]]]] = {
    "as built": [],
    "unfused projections": [(llama.Attention, "forward", _attn_unfused)],
    "torch RMSNorm/RoPE/SiLU": [
        (RMSNorm, "forward", _norm_torch),
        (RMSNorm, "add_forward", _add_norm_torch),
        (RotaryEmbedding, "forward", _rope_torch),
        (llama.MLP, "forward", _mlp_torch),
    ],
    "transformers' op sequence (all but attention)": [
        (llama.Attention, "forward", _attn_unfused),
        (llama.MLP, "forward", _mlp_unfused_torch),
        (RMSNorm, "forward", _norm_torch),
        (RMSNorm, "add_forward", _add_norm_torch),
        (RotaryEmbedding, "forward", _rope_torch),
    ],
    "attention by torch SDPA as transformers calls it": [
        (llama, "paged_attention", _sdpa_attention),
    ],
    "transformers' op sequence and SDPA attention": [
        (llama, "paged_attention", _sdpa_attention),
        (llama.Attention, "forward", _attn_unfused),
        (llama.MLP, "forward", _mlp_unfused_torch),
        (RMSNorm, "forward", _norm_torch),
        (RMSNorm, "add_forward", _add_norm_torch),
        (RotaryEmbedding, "forward", _rope_torch),
    ],
}


@torch.inference_mode()
def _tandem_logits(llm: LLM, texts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    runner = llm.engine.runner
    bs = runner.config.block_size
    out = []
    for ids in texts:
        table = tuple(range(-(-len(ids) // bs)))
        _ROW["table"] = torch.tensor(table, device="cuda")
        logits = []
        for start in range(0, len(ids), chunk):
            _ROW["start"] = start
            c = tuple(ids[start : start + chunk])
            row = ScheduledRow("tf", c, start, table, False, SamplingParams(), 0)
            input_ids, positions, meta, _ = runner._prepare_eager((row,))
            hidden = runner.model(input_ids, positions, meta, runner.kv_cache)
            logits.append(runner.model.compute_logits(hidden))
        out.append(torch.cat(logits))
    return out


@torch.inference_mode()
def _hf_logits(hf: Any, texts: list[list[int]], chunk: int | None = None) -> list[torch.Tensor]:
    if chunk is None:
        return [hf(torch.tensor([t], device=hf.device)).logits[0] for t in texts]
    from transformers import DynamicCache

    out = []
    for t in texts:
        try:
            cache = DynamicCache(config=hf.config)
        except TypeError:
            cache = DynamicCache()
        parts = []
        for s in range(0, len(t), chunk):
            ids = torch.tensor([t[s : s + chunk]], device=hf.device)
            parts.append(hf(ids, past_key_values=cache, use_cache=True).logits[0])
        out.append(torch.cat(parts))
    return out


def e2e(model_dir: Path, hf: Any, llm: LLM, texts: list[list[int]]) -> dict[str, Any]:
    ref = _hf_logits(hf, texts)
    out: dict[str, Any] = {"logits_dtype": str(ref[0].dtype)}
    for name, patches in VARIANTS.items():
        with _patched(patches):
            for chunk, label in ((10_000, "one chunk"), (CHUNK, f"{CHUNK}-token chunks")):
                key = f"Tandem, {name}, {label}"
                try:
                    out[key] = logits_agreement(_tandem_logits(llm, texts, chunk), ref)
                except Exception:  # an experiment failing must not hide the others
                    out[key] = {"error": traceback.format_exc()[-600:]}
    try:
        out[f"transformers sdpa, {CHUNK}-token chunks + KV cache"] = logits_agreement(
            _hf_logits(hf, texts, CHUNK), ref
        )
    except Exception:
        out["transformers chunked"] = {"error": traceback.format_exc()[-600:]}
    from torch.nn.attention import sdpa_kernel

    for bname, backend in _sdpa_backends():
        try:
            with sdpa_kernel(backend):
                out[f"transformers sdpa forced {bname}"] = logits_agreement(
                    _hf_logits(hf, texts), ref
                )
        except Exception:
            out[f"transformers sdpa forced {bname}"] = {"error": traceback.format_exc()[-300:]}
    eager = _hf(model_dir, "eager")
    out["transformers eager"] = logits_agreement(_hf_logits(eager, texts), ref)
    del eager
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="gpu_numerics.json")
    ns = p.parse_args()
    started = time.time()
    from transformers import AutoTokenizer

    model_dir = Path(ns.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok(a + b)["input_ids"] for a, b in zip(TEXTS, TEXTS[1:] + TEXTS[:1], strict=True)]
    hf = _hf(model_dir)
    llm = LLM(
        str(model_dir),
        tokenizer=False,
        device="cuda",
        dtype="bfloat16",
        max_model_len=2048,
        num_blocks=1024,
        max_num_seqs=8,
        max_num_batched_tokens=2048,
    )
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (
        ("ops", lambda: ops(hf, llm, texts[0])),
        ("gemm", lambda: gemms(hf, llm, texts[0])),
        ("e2e", lambda: e2e(model_dir, hf, llm, texts)),
    ):
        try:
            result[name] = fn()
        except Exception:
            result[name] = {"error": traceback.format_exc()}
            print(f"{name} failed:\n{result[name]['error']}")
        Path(ns.out).write_text(json.dumps(result, indent=1))
    result["seconds"] = time.time() - started
    Path(ns.out).write_text(json.dumps(result, indent=1))
    _print(result)


def _print(r: dict[str, Any]) -> None:
    print(f"device: {r['device']}  torch {r['torch']}  ({r['seconds']:.0f} s)")
    if "error" not in r.get("ops", {"error": 1}):
        print(
            f"\n{'op on transformers inputs (all layers)':<50}{'differ':>10}{'>1 ulp':>10}"
            f"{'max ulps':>10}{'layers':>8}"
        )
        for k, v in r["ops"].items():
            print(
                f"{k:<50}{v['frac_differ']:>10.6f}{v['frac_over_1ulp']:>10.6f}"
                f"{v['max_ulps']:>10.1f}{v['layers_differ']:>5}/{v['layers']}"
            )
    if "error" not in r.get("gemm", {"error": 1}):
        print("\nGEMMs, fraction of elements not bitwise equal")
        for m, row in r["gemm"].items():
            print(f"  {m:<7}" + "  ".join(f"{k}: {v['frac_differ']:.4f}" for k, v in row.items()))
    if "error" not in r.get("e2e", {"error": 1}):
        print(f"\nend to end vs transformers sdpa bf16 (logits {r['e2e']['logits_dtype']})")
        for k, v in r["e2e"].items():
            if isinstance(v, dict):
                print(f"  {k}: " + (summary(v) if "strict" in v else v["error"].splitlines()[-1]))


if __name__ == "__main__":
    main()
