"""Reference-numerics attention: torch SDPA called per request exactly as transformers' sdpa
attention calls it, over K/V gathered out of the paged pool (EngineConfig.numerics="reference").

The point is bit-parity with transformers on the same device, not speed: whichever SDPA backend
torch picks for transformers' call (cuDNN on an H200, flash/math on CPU) it picks for ours,
because the call is the same, argument for argument and layout for layout
(transformers.integrations.sdpa_attention.sdpa_attention_forward, checked against 5.17 and 5.23):

  - q: [1, Hq, n, D], a transposed view of the [n, Hq, D] projection (transformers' q layout);
  - k, v: [1, Hk, ctx, D] contiguous, as transformers' DynamicCache returns them (torch.cat),
    gathered from the pool after this step's K/V were written to it; ctx = cached + n;
  - a chunk with nothing cached and n > 1 (transformers: no mask, the causal mask skipped):
    is_causal=True, enable_gqa=True when Hq > Hk;
  - one new token (transformers' generate decode, batch 1): no mask, is_causal=False,
    enable_gqa=True when Hq > Hk; each request its own call, never a padded batch;
  - a chunk over a cached prefix (transformers with a KV cache: a bool mask, hence no GQA in
    SDPA): KV heads repeated with repeat_kv, bool mask [1, 1, n, ctx] (True = attend);
  - scale = D ** -0.5 passed explicitly, dropout 0; the output transposed back and made
    contiguous ([n, Hq, D]), as transformers hands it to o_proj.

A prefix-cache hit therefore takes the masked call where an uncached run of the same prompt
takes is_causal: both are transformers' own calls, but their bits can differ in the last place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class ReferenceSpan:
    """One request's rows of the step: tokens [start, start + num_tokens) of the flat batch."""

    start: int
    num_tokens: int
    num_computed_tokens: int  # K/V already in the pool before this step
    block_table: torch.Tensor  # [ceil((num_computed + num_tokens) / block_size)] long
    mask: torch.Tensor | None  # [1, 1, n, ctx] bool, only for n > 1 over a cached prefix


@dataclass(frozen=True, slots=True)
class ReferenceAttentionMetadata:
    """Built once per step by engine/reference_runner.py, shared by every layer."""

    slot_blocks: torch.Tensor  # [N] long: block id of each new token
    slot_offsets: torch.Tensor  # [N] long: offset inside that block
    spans: tuple[ReferenceSpan, ...]


def causal_mask(num_computed: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """[1, 1, n, ctx] bool: query i (position num_computed + i) sees keys 0..num_computed + i."""
    ctx = num_computed + num_tokens
    q_pos = torch.arange(num_computed, ctx).unsqueeze(1)
    k_pos = torch.arange(ctx).unsqueeze(0)
    return (k_pos <= q_pos).view(1, 1, num_tokens, ctx).to(device)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, Hk * n_rep, T, D]: transformers' repeat_kv, op for op."""
    b, hk, t, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, hk, n_rep, t, d).reshape(b, hk * n_rep, t, d)


def _context(cache: torch.Tensor, table: torch.Tensor, ctx: int) -> torch.Tensor:
    """cache [NB, bs, Hk, D] -> the request's first ctx tokens as [1, Hk, ctx, D], contiguous."""
    g = cache.index_select(0, table).flatten(0, 1)[:ctx]  # [ctx, Hk, D]
    return g.transpose(0, 1).unsqueeze(0).contiguous()


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: ReferenceAttentionMetadata,
) -> torch.Tensor:
    """q [N, Hq, D], k/v [N, Hk, D] for the step's new tokens -> output [N, Hq, D].

    Writes the new tokens' K/V into their slots of k_cache / v_cache, then attends per span.
    """
    k_cache[meta.slot_blocks, meta.slot_offsets] = k
    v_cache[meta.slot_blocks, meta.slot_offsets] = v
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5
    gqa = {"enable_gqa": True} if groups > 1 else {}  # transformers passes nothing at groups 1
    for span in meta.spans:
        n, ctx = span.num_tokens, span.num_computed_tokens + span.num_tokens
        qq = q[span.start : span.start + n].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D] view
        kk = _context(k_cache, span.block_table, ctx)
        vv = _context(v_cache, span.block_table, ctx)
        if span.mask is None:  # nothing cached (is_causal if n > 1) or one new token
            o = F.scaled_dot_product_attention(
                qq, kk, vv, attn_mask=None, dropout_p=0.0, scale=scale, is_causal=n > 1, **gqa
            )
        else:
            o = F.scaled_dot_product_attention(
                qq,
                repeat_kv(kk, groups),
                repeat_kv(vv, groups),
                attn_mask=span.mask,
                dropout_p=0.0,
                scale=scale,
                is_causal=False,
            )
        out[span.start : span.start + n] = o.transpose(1, 2).contiguous()[0]
    return out
