"""GpuModelRunner: the ModelRunner for CUDA devices (Triton paged attention, CUDA graphs).

Same contract as ModelRunner (StepPlan in, StepResult out); only how inputs reach the GPU and
how the forward runs differ:
  - inputs are built on the host, pinned, and copied with non_blocking=True: the step's only
    host sync is `collect`'s wait for the sampled token ids (greedy rows with no logit_bias,
    bans or penalties; those copy index tensors from pageable memory, which syncs);
  - with tensor parallelism and overlapped steps, rank 0 broadcasts the sampled ids over
    NCCL (on the stream) so every rank feeds the next plan's token_on_device rows itself;
  - decode-only steps of <= max_num_seqs rows replay a CUDA graph (engine/cuda_graphs.py);
    steps with prefill chunks run eagerly (their time is in the GEMMs, not in launches).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, DecodeInputs, buckets_up_to
from engine.gpu_attention import PREFILL_BLOCK_M, GpuAttentionMetadata, decode_num_splits
from engine.model_runner import LaunchedStep, ModelRunner
from engine.plan import ScheduledRow, StepPlan


def _pinned(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).pin_memory()


class GpuModelRunner(ModelRunner):
    def __init__(self, config: EngineConfig, num_valid_tokens: int | None = None) -> None:
        super().__init__(config, num_valid_tokens)
        if self.device.type != "cuda":
            raise ValueError(f"GpuModelRunner needs a CUDA device, got {self.device}")
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.max_blocks = -(-config.max_model_len // config.block_size)
        shards = config.tp_invariant_shards
        # TP-invariant mode: one decode split count for every step, from the kv heads of a
        # TP=S rank and the largest batch (the same on every TP size, and for every batch), and
        # one CUDA graph bucket, max_num_seqs rows: every decode-only step runs the same GEMM
        # shapes whatever its batch, so a row's numbers do not depend on its neighbours either
        self._fixed_splits = (
            None
            if shards is None
            else decode_num_splits(
                config.max_num_seqs, config.model.num_kv_heads // shards, self.num_sms
            )
        )
        self.graphs: DecodeGraphs | None = None
        if not config.enforce_eager:
            buckets = (
                buckets_up_to(config.max_num_seqs) if shards is None else (config.max_num_seqs,)
            )
            self.graphs = DecodeGraphs(
                self.model, self.kv_cache, buckets, self.max_blocks, self.decode_splits
            )

    def decode_splits(self, batch: int) -> int:
        """Context splits of the decode attention for a step of `batch` decode rows."""
        if self._fixed_splits is not None:
            return self._fixed_splits
        return decode_num_splits(batch, self.kv_cache.layout.num_kv_heads, self.num_sms)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Rank 0 (and a single GPU): queue the whole step; with tensor parallelism the plan
        goes to the other ranks first, which run the same forward in serve_followers()."""
        if self.tp.world_size > 1:
            dist.broadcast_object_list([plan], src=0, group=self.tp.plan_group)
        return self._launch(plan, leader=True)

    def _follow(self, plan: StepPlan) -> None:
        """Never syncs with its GPU: a follower runs as far ahead as rank 0's plans let it."""
        self._launch(plan, leader=False)

    def _launch(self, plan: StepPlan, leader: bool) -> LaunchedStep:
        rows = plan.rows
        sampling_rows = tuple(r for r in rows if r.sample)
        graphs = self.graphs
        logits: torch.Tensor | None = None
        if (
            graphs is not None
            and len(rows) <= graphs.max_batch
            and all(r.num_new_tokens == 1 for r in rows)
        ):
            inputs = self._decode_inputs(rows, graphs.bucket_for(len(rows)))
            graphs.load(inputs)
            self._feed_on_device(graphs.input_ids, *_on_device(rows))
            logits = graphs.replay(inputs.bucket)
            if leader and sampling_rows:
                logits = logits[: len(rows)]
                if len(sampling_rows) != len(rows):
                    idx = [i for i, r in enumerate(rows) if r.sample]
                    logits = logits[self._index_tensor(idx)]
        else:
            input_ids, positions, meta, flat_sample_idx = self._prepare_eager(rows)
            hidden = self.model(input_ids, positions, meta, self.kv_cache)
            if leader and sampling_rows:
                logits = self.model.compute_logits(hidden[flat_sample_idx])
        if not sampling_rows:
            return self._launched(sampling_rows, None, None)
        raw_logprobs = None
        if leader:
            assert logits is not None
            next_ids, raw_logprobs = self.sampler.sample(logits, sampling_rows)
        else:
            next_ids = torch.empty(len(sampling_rows), dtype=torch.long, device=self.device)
        if self.tp.world_size > 1 and self.config.async_scheduling:
            # every rank feeds the next plan's token_on_device rows from its own copy
            dist.broadcast(next_ids, src=0)
        if not leader:
            self._last_sampled = (next_ids, {r.request_id: i for i, r in enumerate(sampling_rows)})
            return LaunchedStep(sampling_rows, next_ids, None, None)  # never collected
        return self._launched(sampling_rows, next_ids, raw_logprobs)

    # ---- decode steps (CUDA graph) ---------------------------------------------------------
    def _decode_inputs(self, rows: tuple[ScheduledRow, ...], bucket: int) -> DecodeInputs:
        bs = self.config.block_size
        n = len(rows)
        ids = np.zeros(bucket, dtype=np.int64)
        pos = np.zeros(bucket, dtype=np.int64)
        slots = np.full(bucket, -1, dtype=np.int64)
        lens = np.zeros(bucket, dtype=np.int32)
        tables = np.zeros((bucket, self.max_blocks), dtype=np.int32)
        for i, r in enumerate(rows):
            p = r.num_computed_tokens
            if r.token_ids:  # else token_on_device: fed on the device after the copy
                ids[i] = r.token_ids[0]
            pos[i] = p
            slots[i] = r.block_table[p // bs] * bs + p % bs
            lens[i] = p + 1
            tables[i, : len(r.block_table)] = r.block_table
        assert n <= bucket
        return DecodeInputs(
            bucket, _pinned(ids), _pinned(pos), _pinned(slots), _pinned(tables), _pinned(lens)
        )

    # ---- mixed / prefill steps (eager) -----------------------------------------------------
    def _prepare_eager(
        self, rows: tuple[ScheduledRow, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, GpuAttentionMetadata, torch.Tensor]:
        bs = self.config.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        dec_tables: list[tuple[int, ...]] = []
        dec_lens: list[int] = []
        pre_tables: list[tuple[int, ...]] = []
        q_start: list[int] = []
        q_len: list[int] = []
        computed: list[int] = []
        tile_seq: list[int] = []
        tile_q0: list[int] = []
        for row in rows:
            start, n, first = len(ids), row.num_new_tokens, row.num_computed_tokens
            ids.extend(row.token_ids)
            if row.token_on_device:
                ids.append(0)  # fed on the device below
            pos.extend(range(first, first + n))
            table = row.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(first, first + n))
            if row.sample:
                sample_idx.append(start + n - 1)
            if n == 1:
                if q_start:
                    raise ValueError("StepPlan rows must list decode rows before prefill rows")
                dec_tables.append(table)
                dec_lens.append(first + 1)
            else:
                p_idx = len(q_start)
                q_start.append(start)
                q_len.append(n)
                computed.append(first)
                pre_tables.append(table[: -(-(first + n) // bs)])
                for q0 in range(0, n, PREFILL_BLOCK_M):
                    tile_seq.append(p_idx)
                    tile_q0.append(q0)
        dev = self.device

        def to_dev(a: np.ndarray) -> torch.Tensor:
            return _pinned(a).to(dev, non_blocking=True)

        def i32(values: list[int]) -> torch.Tensor:
            return to_dev(np.asarray(values, dtype=np.int32))

        nd = len(dec_lens)
        meta = GpuAttentionMetadata(
            slot_mapping=to_dev(np.asarray(slots, dtype=np.int64)),
            num_decodes=nd,
            decode_block_tables=to_dev(_pad(dec_tables)),
            decode_context_lens=i32(dec_lens),
            decode_num_splits=self.decode_splits(max(nd, 1)),
            prefill_tile_seq=i32(tile_seq),
            prefill_tile_q0=i32(tile_q0),
            prefill_q_start=i32(q_start),
            prefill_q_len=i32(q_len),
            prefill_num_computed=i32(computed),
            prefill_block_tables=to_dev(_pad(pre_tables)),
        )
        ids_t = to_dev(np.asarray(ids, dtype=np.int64))
        self._feed_on_device(ids_t, *_on_device(rows))
        return (
            ids_t,
            to_dev(np.asarray(pos, dtype=np.int64)),
            meta,
            to_dev(np.asarray(sample_idx, dtype=np.int64)),
        )


def _on_device(rows: tuple[ScheduledRow, ...]) -> tuple[list[int], list[str]]:
    """(token index, request id) of the token_on_device rows: decode rows, listed first, so
    their token index is their row index."""
    idx = [i for i, r in enumerate(rows) if r.token_on_device]
    return idx, [rows[i].request_id for i in idx]


def _pad(tables: list[tuple[int, ...]]) -> np.ndarray:
    """Block tables -> [len(tables), max width] int32, padded with block 0 (never read: the
    kernels stop at each row's context length)."""
    width = max((len(t) for t in tables), default=1)
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out
