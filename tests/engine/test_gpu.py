"""GPU engine: Triton paged attention against the SDPA path on the same device, CUDA-graph
decode against eager, and greedy parity with transformers on the GPU (fp32: token-exact).

All skipped without CUDA (the dev box and CI have none; run on the device machine).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import LLM, SamplingParams
from engine.attention import AttentionMetadata, PrefillSpan, paged_attention
from engine.gpu_attention import PREFILL_BLOCK_M, GpuAttentionMetadata, decode_num_splits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BS = 16


def _i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("hq", "hk", "d"), [(32, 8, 128), (9, 3, 64), (4, 2, 16)])
def test_triton_attention_matches_sdpa(dtype: torch.dtype, hq: int, hk: int, d: int) -> None:
    """A mixed step (3 decode rows, a fresh prefill, a chunk over a cached prefix) through the
    Triton kernels and through the SDPA path, on pools that start with the same contents."""
    torch.manual_seed(0)
    rng = random.Random(0)
    num_blocks, layers = 128, 2
    pool = torch.randn(num_blocks, layers, 2, BS, hk, d, device="cuda", dtype=dtype)
    # rows: (num_computed, num_new); decode rows first
    rows = [(37, 1), (1, 1), (300, 1), (0, 70), (130, 45)]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = []
    for computed, new in rows:
        nb = -(-(computed + new) // BS)
        tables.append([free.pop() for _ in range(nb)])
    n = sum(new for _, new in rows)
    q = torch.randn(n, hq, d, device="cuda", dtype=dtype)
    k = torch.randn(n, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(n, hk, d, device="cuda", dtype=dtype)
    positions = [p for c, m in rows for p in range(c, c + m)]
    row_of = [i for i, (_, m) in enumerate(rows) for _ in range(m)]
    slot_blocks = [tables[r][p // BS] for r, p in zip(row_of, positions, strict=True)]
    slots = [b * BS + p % BS for b, p in zip(slot_blocks, positions, strict=True)]

    # reference: the device-neutral SDPA path
    ref_pool = pool.clone()
    spans, start = [], 3
    for (c, m), t in zip(rows[3:], tables[3:], strict=True):
        if c == 0:
            spans.append(PrefillSpan(start, start + m, 0, torch.empty(0), None))
        else:
            ctx = c + m
            mask = torch.arange(ctx).view(1, ctx) <= torch.arange(c, ctx).view(m, 1)
            table = torch.tensor(t[: -(-ctx // BS)], device="cuda")
            spans.append(PrefillSpan(start, start + m, c, table, mask.view(1, 1, m, ctx).cuda()))
        start += m
    width = max(len(t) for t in tables[:3])
    dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables[:3]], device="cuda")
    lens = torch.tensor([c + 1 for c, _ in rows[:3]])
    dec_mask = (torch.arange(width * BS).view(1, -1) < lens.view(-1, 1)).view(3, 1, 1, -1)
    ref_meta = AttentionMetadata(
        slot_blocks=torch.tensor(slot_blocks, device="cuda"),
        slot_offsets=torch.tensor([p % BS for p in positions], device="cuda"),
        num_decodes=3,
        decode_block_tables=dec_tables,
        decode_seq_lens=lens.cuda(),
        decode_kernel=False,
        decode_mask=dec_mask.cuda(),
        prefills=tuple(spans),
    )
    ref = paged_attention(q, k, v, ref_pool[:, 1, 0], ref_pool[:, 1, 1], ref_meta)

    tile_seq, tile_q0 = [], []
    for p, (_, m) in enumerate(rows[3:]):
        for q0 in range(0, m, PREFILL_BLOCK_M):
            tile_seq.append(p)
            tile_q0.append(q0)
    pre_width = max(len(t) for t in tables[3:])
    meta = GpuAttentionMetadata(
        slot_mapping=torch.tensor(slots, device="cuda"),
        num_decodes=3,
        decode_block_tables=dec_tables.to(torch.int32),
        decode_context_lens=lens.to(torch.int32).cuda(),
        decode_num_splits=decode_num_splits(3, hk, 132),
        prefill_tile_seq=_i32(tile_seq),
        prefill_tile_q0=_i32(tile_q0),
        prefill_q_start=_i32([3, 73]),
        prefill_q_len=_i32([70, 45]),
        prefill_num_computed=_i32([0, 130]),
        prefill_block_tables=_i32([t + [0] * (pre_width - len(t)) for t in tables[3:]]).view(
            2, pre_width
        ),
    )
    out = paged_attention(q, k, v, pool[:, 1, 0], pool[:, 1, 1], meta)
    assert torch.equal(pool, ref_pool)  # same slots written, nothing else touched
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_triton_gemv_matches_unfused(dtype: torch.dtype, m: int) -> None:
    """triton_gemv.linear with each prologue/epilogue against the unfused kernels + F.linear."""
    from engine import triton_fused, triton_gemv

    torch.manual_seed(m)
    n, k = 96, 320  # not multiples of the tiles: masked edges
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / 8
    b = torch.randn(n, device="cuda", dtype=dtype)
    nw = 1 + torch.randn(k, device="cuda", dtype=dtype) / 4
    res = torch.randn(m, n, device="cuda", dtype=dtype)
    w2 = torch.randn(2 * n, k, device="cuda", dtype=dtype) / 8  # [gate; up]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for tile in [None, (8, 128, 4), (2, 512, 8)]:
        cases = [
            (triton_gemv.linear(x, w, b, tile=tile), F.linear(x, w, b)),
            (
                triton_gemv.linear(x, w, norm=(nw, 1e-5), tile=tile),
                F.linear(triton_fused.rms_norm(x, nw, 1e-5), w),
            ),
            (triton_gemv.linear(x, w, residual=res, tile=tile), F.linear(x, w) + res),
            (
                triton_gemv.linear(x, w2, norm=(nw, 1e-5), silu_mul=True, tile=tile),
                triton_fused.silu_and_mul(F.linear(triton_fused.rms_norm(x, nw, 1e-5), w2)),
            ),
        ]
        for got, ref in cases:
            torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_kernels_round_as_torch(dtype: torch.dtype) -> None:
    """Both Triton RoPE kernels give transformers' `q * cos + rotate_half(q) * sin` bit for bit:
    each product rounded to the dtype before the add (no FMA across it: ROPE_NO_FMA)."""
    from engine import triton_fused
    from engine.layers import RotaryEmbedding

    torch.manual_seed(0)
    n, hq, hk, d = 300, 9, 3, 64
    rot = RotaryEmbedding(d, 4096, 100000.0, None).cuda()
    q = torch.randn(n, hq, d, device="cuda", dtype=dtype) * 3
    k = torch.randn(n, hk, d, device="cuda", dtype=dtype) * 3
    pos = torch.randint(0, 4096, (n,), device="cuda")
    cos, sin = rot.cos[pos].unsqueeze(1).to(dtype), rot.sin[pos].unsqueeze(1).to(dtype)

    def ref(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    assert torch.equal(triton_fused.rope(pos, q, rot.cos, rot.sin), ref(q))
    assert torch.equal(triton_fused.rope(pos, k, rot.cos, rot.sin), ref(k))
    pool = torch.zeros(-(-n // BS), 2, BS, hk, d, device="cuda", dtype=dtype)
    slots = torch.arange(n, device="cuda")
    got = triton_fused.rope_store_kv(pos, q, k, k, rot.cos, rot.sin, pool[:, 0], pool[:, 1], slots)
    assert torch.equal(got, ref(q))
    assert torch.equal(pool[:, 0].reshape(-1, hk, d)[:n], ref(k))


def test_rope_store_kv_matches_rope_then_store() -> None:
    from engine import triton_fused, triton_kernels

    torch.manual_seed(0)
    n, hq, hk, d, nb = 5, 8, 2, 64, 6
    qkv = torch.randn(n, (hq + 2 * hk) * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.view(n, -1, d) for t in qkv.split([hq * d, hk * d, hk * d], dim=-1))
    pos = torch.tensor([3, 0, 17, 40, 9], device="cuda")
    slots = torch.tensor([5, -1, 30, 77, 2], device="cuda")
    cos = torch.randn(64, d, device="cuda")
    sin = torch.randn(64, d, device="cuda")
    pool = torch.randn(nb, 2, BS, hk, d, device="cuda", dtype=torch.bfloat16)
    ref_pool = pool.clone()
    got_q = triton_fused.rope_store_kv(pos, q, k, v, cos, sin, pool[:, 0], pool[:, 1], slots)
    ref_q = triton_fused.rope(pos, q, cos, sin)
    k_rot = triton_fused.rope(pos, k, cos, sin)
    triton_kernels.store_kv(k_rot, v, ref_pool[:, 0], ref_pool[:, 1], slots)
    assert torch.equal(got_q, ref_q)
    assert torch.equal(pool, ref_pool)


GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("name", ["llama", "qwen3", "llama3_rope_tied"])
def test_tiny_models_match_transformers_on_gpu(tiny_model_dirs: dict[str, Path], name: str) -> None:
    """fp32 on the GPU, CUDA graphs on and off, batched and alone: token-exact against
    transformers fp32."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dirs[name]
    rng = random.Random(sum(map(ord, name)))
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (40, 5, 100, 17)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    reference = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        reference.append(out[0, len(p) :].tolist())
    for eager in (True, False):
        llm = LLM(
            str(model_dir),
            tokenizer=False,
            device="cuda",
            dtype="float32",
            max_num_batched_tokens=48,
            num_blocks=64,
            max_num_seqs=8,
            max_model_len=256,
            enforce_eager=eager,
        )
        results = llm.generate(prompts, GREEDY)
        llm.engine.check_integrity()
        got = [r.outputs[0].token_ids for r in results]
        assert got == reference, f"{name} eager={eager}"
        # one request alone: its decode steps are batch 1, the GEMV path (triton_gemv)
        alone = llm.generate([prompts[2]], GREEDY)[0].outputs[0].token_ids
        assert alone == reference[2], f"{name} eager={eager}, batch 1"
