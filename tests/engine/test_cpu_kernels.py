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
