"""ReferenceModelRunner: the model runner of numerics="reference", on any device.

Opt-in (EngineConfig.numerics = "reference", `--numerics reference`), like vLLM's
batch-invariant mode: the engine computes transformers' function with transformers' own ops, so
that its logits equal transformers' on the same device bit for bit (where cuBLAS is row-invariant,
as it is for SmolLM2 on an H200) and its greedy text equals transformers' generate. What differs
from the fast runners (GpuModelRunner, ModelRunner on CPU), and nothing else:

  - attention: engine/reference_attention.py, torch SDPA per request over K/V gathered from the
    paged pool, called as transformers' sdpa attention calls it (not the Triton kernels, not the
    CPU C kernels, not a padded batch);
  - norms, RoPE, SiLU-and-mul: engine/reference_layers.py, transformers' torch op sequence;
  - linears: nn.Linear (cuBLAS / oneDNN through F.linear): no batch-1 Triton GEMV path (it needs
    GpuAttentionMetadata), no prepacked CPU weights;
  - no CUDA graphs (EngineConfig requires enforce_eager), one rank (no tensor parallelism).
Scheduling, the paged KV pool, prefix caching, chunked prefill, sampling and overlapped steps are
the engine's as in fast mode. Inputs reach the device with plain copies (not pinned): the mode
is for parity, not speed (docs/benchmarks.md gives its cost).
"""

from __future__ import annotations

import torch

from engine.model_runner import ModelRunner
from engine.plan import StepPlan
from engine.reference_attention import ReferenceAttentionMetadata, ReferenceSpan, causal_mask
from engine.reference_layers import use_reference_layers


class ReferenceModelRunner(ModelRunner):
    def _adapt_model(self, dtype: torch.dtype) -> bool:
        use_reference_layers(self.model)
        return False  # no C kernels

    def _prepare(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor, ReferenceAttentionMetadata, torch.Tensor]:
        bs = self.config.block_size
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        sample_idx: list[int] = []
        spans: list[ReferenceSpan] = []
        on_device_rows: list[int] = []
        on_device_ids: list[str] = []
        for row in plan.rows:
            start, n, first = len(input_ids), row.num_new_tokens, row.num_computed_tokens
            input_ids.extend(row.token_ids)
            if row.token_on_device:
                on_device_rows.append(start)
                on_device_ids.append(row.request_id)
                input_ids.append(0)  # overwritten on the device below
            pos = range(first, first + n)
            positions.extend(pos)
            slot_blocks.extend(row.block_table[p // bs] for p in pos)
            if row.sample:
                sample_idx.append(start + n - 1)
            table = row.block_table[: -(-(first + n) // bs)]
            spans.append(
                ReferenceSpan(
                    start,
                    n,
                    first,
                    torch.tensor(table, dtype=torch.long).to(dev),
                    causal_mask(first, n, dev) if n > 1 and first > 0 else None,
                )
            )
        pos_t = torch.tensor(positions, dtype=torch.long)
        meta = ReferenceAttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long).to(dev),
            slot_offsets=(pos_t % bs).to(dev),
            spans=tuple(spans),
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(dev)
        self._feed_on_device(ids_t, on_device_rows, on_device_ids)
        return ids_t, pos_t.to(dev), meta, torch.tensor(sample_idx, dtype=torch.long).to(dev)
