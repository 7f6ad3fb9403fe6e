"""engine.cpu_kernels against torch references (SDPA over gathered, masked contexts)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernels


@pytest.mark.parametrize(("hq", "hk", "d", "bs"), [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 4)])
def test_paged_decode_attention_matches_sdpa(hq: int, hk: int, d: int, bs: int) -> None:
    g = torch.Generator().manual_seed(hq * 1000 + d)
    num_blocks, layers = 64, 3
    pool = torch.randn(num_blocks, layers, 2, bs, hk, d, generator=g)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]  # strided views, as the engine passes them
    lens = torch.tensor([1, bs, bs + 1, 5 * bs - 3, 37])
    width = int(-(-lens.max() // bs))
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in lens])
    q = torch.randn(len(lens), hq, d, generator=g)

    out = torch.full_like(q, float("nan"))
    cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5, out=out)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # rows split over 2 OpenMP threads: the same bits
    try:
        out2 = cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, d**-0.5)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, out2)

    kd = k_cache[tables].flatten(1, 2).transpose(1, 2)  # [B, Hk, T, D]
    vd = v_cache[tables].flatten(1, 2).transpose(1, 2)
    mask = (torch.arange(width * bs).view(1, -1) < lens.view(-1, 1)).view(len(lens), 1, 1, -1)
    ref = F.scaled_dot_product_attention(
        q.unsqueeze(2), kd, vd, attn_mask=mask, enable_gqa=True
    ).squeeze(2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_decode_attention_rejects_bad_input() -> None:
    pool = torch.zeros(4, 16, 2, 8)
    q = torch.zeros(1, 2, 8)
    tables, lens = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.paged_decode_attention(
            q.double(), pool.double(), pool.double(), tables, lens, 1.0
        )
    with pytest.raises(ValueError, match="one row per query"):
        cpu_kernels.paged_decode_attention(q, pool, pool, tables, lens.repeat(2), 1.0)


def test_elementwise_kernels_match_torch_layers() -> None:
    from engine.layers import RMSNorm, RotaryEmbedding

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 2 * 96, generator=g)[:, :96]  # strided rows, as a split's view
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96, generator=g)
    torch.testing.assert_close(cpu_kernels.rms_norm(x, norm.weight, 1e-5), norm(x))

    gate_up = torch.randn(37, 2 * 80, generator=g) * 6
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate) * up)

    rotary = RotaryEmbedding(32, 512, 10000.0, None)
    qkv = torch.randn(37, 7 * 32, generator=g)
    q, k = qkv[:, : 4 * 32].view(37, 4, 32), qkv[:, 4 * 32 : 6 * 32].view(37, 2, 32)
    positions = torch.randint(0, 512, (37,), generator=g)
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())
    v_before = qkv[:, 6 * 32 :].clone()
    cpu_kernels.rope_(q, positions, rotary.cos, rotary.sin)
    cpu_kernels.rope_(k, positions, rotary.cos, rotary.sin)
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)  # same arithmetic, bit for bit
    assert torch.equal(qkv[:, 6 * 32 :], v_before)  # only q and k were touched


def test_kv_write_matches_index_put() -> None:
    g = torch.Generator().manual_seed(5)
    pool = torch.randn(16, 2, 2, 4, 3, 8, generator=g)
    ref = pool.clone()
    kv = torch.randn(6, 5 * 3 * 8, generator=g)  # strided tokens, as the qkv split gives them
    k, v = kv[:, 24:48].view(6, 3, 8), kv[:, 48:72].view(6, 3, 8)
    blocks = torch.tensor([3, 3, 9, 0, 15, 7])
    offsets = torch.tensor([0, 3, 1, 2, 3, 0])
    cpu_kernels.kv_write(k, v, pool[:, 1, 0], pool[:, 1, 1], blocks, offsets)
    ref[:, 1, 0][blocks, offsets] = k
    ref[:, 1, 1][blocks, offsets] = v
    assert torch.equal(pool, ref)


@pytest.mark.parametrize(("hq", "hk", "d", "bs"), [(9, 3, 64, 16), (4, 4, 32, 8), (8, 2, 128, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_prefill_attention_matches_sdpa(
    hq: int, hk: int, d: int, bs: int, threads: int
) -> None:
    """Spans that start at 0 and spans that continue a context, against causal SDPA over the
    gathered context; the same bits whatever the thread count and the span's neighbours."""
    g = torch.Generator().manual_seed(hq * 100 + d)
    num_blocks = 96
    pool = torch.randn(num_blocks, 2, 2, bs, hk, d, generator=g)
    k_cache, v_cache = pool[:, 1, 0], pool[:, 1, 1]
    spans = [(0, 37, 0), (37, 5, 20), (42, 1, 3), (43, 40, 2 * bs + 1)]  # (start, n, computed)
    n_tok = sum(s[1] for s in spans)
    width = max(-(-(n + c) // bs) for _, n, c in spans)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.stack([perm[i * width : (i + 1) * width] for i in range(len(spans))])
    qkv = torch.randn(n_tok, (hq + 2 * hk) * d, generator=g)
    q = qkv[:, : hq * d].view(n_tok, hq, d)  # strided tokens, as the qkv split gives them
    bounds = torch.tensor(spans, dtype=torch.long)

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full((n_tok, hq, d), float("nan"))
        cpu_kernels.paged_prefill_attention(q, k_cache, v_cache, tables, bounds, d**-0.5, out)
        alone = torch.full((5, hq, d), float("nan"))  # span 1 on its own, at token 0
        cpu_kernels.paged_prefill_attention(
            q[37:42], k_cache, v_cache, tables[1:2], torch.tensor([[0, 5, 20]]), d**-0.5, alone
        )
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone, out[37:42])

    for i, (start, n, computed) in enumerate(spans):
        ctx = computed + n
        kd = k_cache[tables[i]].flatten(0, 1)[:ctx].transpose(0, 1)  # [Hk, ctx, D]
        vd = v_cache[tables[i]].flatten(0, 1)[:ctx].transpose(0, 1)
        mask = torch.arange(ctx).view(1, -1) <= torch.arange(computed, ctx).view(-1, 1)
        ref = F.scaled_dot_product_attention(
            q[start : start + n].transpose(0, 1).unsqueeze(0),
            kd.unsqueeze(0),
            vd.unsqueeze(0),
            attn_mask=mask,
            enable_gqa=True,
        )
        got = out[start : start + n]
        torch.testing.assert_close(got, ref.squeeze(0).transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_add_rms_norm_matches_add_then_norm() -> None:
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(96, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (5, 3000):  # 3000 x 96 crosses the kernels' parallel threshold
            x, residual = torch.randn(rows, 96, generator=g), torch.randn(rows, 96, generator=g)
            out, s = cpu_kernels.add_rms_norm(x, residual, weight, 1e-5)
            assert torch.equal(s, x + residual)
            assert torch.equal(out, cpu_kernels.rms_norm(x + residual, weight, 1e-5))
    finally:
        torch.set_num_threads(before)


def test_keep_freed_memory_on_glibc() -> None:
    import platform

    from engine import cpu_memory

    assert cpu_memory.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
