"""ModelRunner: StepPlan -> input tensors -> forward -> sample -> StepResult.

Owns the model, the KV pool tensor and the sampler; never reads scheduler state.

A step runs in two halves: `launch(plan)` queues the forward pass and the sampling on the
device and returns a LaunchedStep; `collect(launched)` waits for its token ids and returns the
StepResult. `execute` is the two back to back. The engine's overlapped loop launches step N+1
before it collects step N; a row of step N+1 with `token_on_device` then reads the token that
step N sampled for its request straight from the device tensor this runner kept
(`_last_sampled`), never from the host. On CPU, launch computes everything at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine import cpu_kernels, cpu_layers, cpu_linear, cpu_memory
from engine.attention import AttentionMetadata, PrefillSpan, StepAttention
from engine.config import EngineConfig
from engine.kv_cache import TORCH_DTYPES, KVCache
from engine.kv_layout import KVLayout
from engine.loader import init_dummy, load_safetensors
from engine.models.llama import CausalLM
from engine.parallel import TensorParallel, kv_layout_for_rank, shard_model
from engine.plan import ScheduledRow, StepPlan, StepResult
from engine.sampler import Sampler
from engine.tp_invariant import shard_model_invariant


@dataclass(frozen=True, slots=True)
class LaunchedStep:
    """A step queued on the device; `ModelRunner.collect` turns it into its StepResult."""

    sampling_rows: tuple[ScheduledRow, ...]
    token_ids: torch.Tensor  # [len(sampling_rows)] int64 on the host, valid once `done` fired
    raw_logprobs: torch.Tensor | None  # [R, vocab] on the device, when a row asks for logprobs
    done: torch.cuda.Event | None  # recorded after the host copy of token_ids; None: on CPU


def kv_layout_for(config: EngineConfig) -> KVLayout:
    m = config.model
    return KVLayout(
        model=f"{m.architecture}/L{m.num_layers}/H{m.hidden_size}/V{m.vocab_size}",
        dtype=config.dtype,
        num_blocks=config.num_blocks,
        block_size=config.block_size,
        num_layers=m.num_layers,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
    )


class ModelRunner:
    def __init__(self, config: EngineConfig, num_valid_tokens: int | None = None) -> None:
        """num_valid_tokens: the tokenizer's vocabulary size when it is smaller than the model's."""
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)  # process-wide: one engine per process
            cpu_memory.keep_freed_memory()  # process-wide too: no page faults per step
        dtype = TORCH_DTYPES[config.dtype]
        with torch.device(self.device):
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                self.model = CausalLM(config.model, config.max_model_len)
            finally:
                torch.set_default_dtype(previous)
        self.model.eval().requires_grad_(False)
        if config.load_format == "dummy":
            init_dummy(self.model, config.seed)
        else:
            load_safetensors(self.model, config.model_dir)
        # Tensor parallelism: cut the loaded model to this rank's shard before anything copies
        # its weights (packing); the pool holds this rank's kv heads only (engine/parallel.py).
        self.tp = TensorParallel.from_initialized(config.tensor_parallel_size)
        if self.tp.world_size > 1 and self.device.type == "cpu" and config.async_scheduling:
            raise ValueError("CPU tensor parallelism runs without overlapped steps")
        if config.tp_invariant_shards is not None:  # TP=1 included: it computes S shards too
            shard_model_invariant(
                self.model, self.tp.rank, self.tp.world_size, config.tp_invariant_shards
            )
        elif self.tp.world_size > 1:
            shard_model(self.model, self.tp)
        self.decode_kernel = self._adapt_model(dtype)
        self.kv_cache = KVCache(kv_layout_for_rank(kv_layout_for(config), self.tp), self.device)
        self.sampler = Sampler(config.model.vocab_size, self.device, config.seed, num_valid_tokens)
        # the token ids the latest launch sampled (on the device) and each sampling request's
        # index in them: the inputs of the next plan's token_on_device rows
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] = (
            torch.zeros(0, dtype=torch.long, device=self.device),
            {},
        )

    def _adapt_model(self, dtype: torch.dtype) -> bool:
        """Swap the loaded (and sharded) model's blocks for the device's fast ones; returns
        whether the CPU C kernels run attention (AttentionMetadata.decode_kernel).
        engine/reference_runner.py overrides it with transformers' op sequence."""
        if cpu_linear.supported(self.device, dtype):
            cpu_linear.pack_linears(self.model)
            if self.model.lm_head is None:  # tied: a packed copy of the embedding for logits
                self.model.lm_head = cpu_linear.PackedLinear(self.model.embed_tokens.weight, None)
        # CPU float32: the C kernels (built now, so a missing compiler fails at start) for decode
        # attention and the elementwise blocks; every other device/dtype runs torch ops and
        # gather + SDPA decode attention.
        decode_kernel = self.device.type == "cpu" and dtype == torch.float32
        if decode_kernel:
            cpu_kernels.library()
            cpu_layers.use_cpu_kernels(self.model)
        return decode_kernel

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Rank 0 (and a single rank): the whole step; with tensor parallelism (CPU, gloo) the
        plan goes to the other ranks first, which run the same forward in serve_followers()."""
        if self.tp.world_size > 1:
            dist.broadcast_object_list([plan], src=0, group=self.tp.plan_group)
        return self._launch_here(plan, sample=True)

    @torch.inference_mode()
    def serve_followers(self) -> None:
        """Ranks > 0: run each plan rank 0 broadcasts until it sends None (stop_followers)."""
        assert self.tp.rank > 0
        while True:
            box: list[StepPlan | None] = [None]
            dist.broadcast_object_list(box, src=0, group=self.tp.plan_group)
            if box[0] is None:
                return
            self._follow(box[0])

    def _follow(self, plan: StepPlan) -> None:
        """A follower rank's share of one step (no sampling: rank 0 samples)."""
        self._launch_here(plan, sample=False)

    def stop_followers(self) -> None:
        """Rank 0: release the other ranks' serve_followers() loops."""
        if self.tp.world_size > 1 and self.tp.rank == 0:
            dist.broadcast_object_list([None], src=0, group=self.tp.plan_group)

    def _launch_here(self, plan: StepPlan, sample: bool) -> LaunchedStep:
        input_ids, positions, meta, sample_idx = self._prepare(plan)
        hidden = self.model(input_ids, positions, meta, self.kv_cache)  # [N, hidden]
        sampling_rows = tuple(r for r in plan.rows if r.sample) if sample else ()
        if not sampling_rows:
            return self._launched(sampling_rows, None, None)
        logits = self.model.compute_logits(hidden[sample_idx])  # [R, vocab]
        next_ids, raw_logprobs = self.sampler.sample(logits, sampling_rows)
        return self._launched(sampling_rows, next_ids, raw_logprobs)

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for the launched step's token ids (the step's one host sync)."""
        if launched.done is not None:
            launched.done.synchronize()
        rows = launched.sampling_rows
        token_ids: list[int] = launched.token_ids.tolist()
        logprobs = self.sampler.logprobs(token_ids, launched.raw_logprobs, rows)
        return StepResult(
            {r.request_id: t for r, t in zip(rows, token_ids, strict=True)},
            {r.request_id: lp for r, lp in zip(rows, logprobs, strict=True) if lp},
        )

    def _launched(
        self,
        rows: tuple[ScheduledRow, ...],
        next_ids: torch.Tensor | None,
        raw_logprobs: torch.Tensor | None,
    ) -> LaunchedStep:
        """Keep `next_ids` for the next plan and start its copy to the host."""
        if next_ids is None:
            next_ids = torch.zeros(0, dtype=torch.long, device=self.device)
        self._last_sampled = (next_ids, {r.request_id: i for i, r in enumerate(rows)})
        if self.device.type != "cuda":
            return LaunchedStep(rows, next_ids, raw_logprobs, None)
        host = torch.empty(next_ids.shape, dtype=torch.long, pin_memory=True)
        host.copy_(next_ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return LaunchedStep(rows, host, raw_logprobs, done)

    def _feed_on_device(
        self, input_ids: torch.Tensor, rows: list[int], request_ids: list[str]
    ) -> None:
        """input_ids[rows[k]] = the token the previous launch sampled for request_ids[k], on
        the device (queued: no host sync)."""
        if not rows:
            return
        prev_ids, index = self._last_sampled
        missing = [r for r in request_ids if r not in index]
        if missing:
            raise RuntimeError(
                f"token_on_device rows for {missing[:3]}: the previous launch did not sample them"
            )
        src = [index[r] for r in request_ids]
        k = len(rows)
        if rows == list(range(rows[0], rows[0] + k)) and src == list(range(src[0], src[0] + k)):
            input_ids[rows[0] : rows[0] + k].copy_(prev_ids[src[0] : src[0] + k])
            return
        dst_t = self._index_tensor(rows)
        src_t = self._index_tensor(src)
        input_ids.index_copy_(0, dst_t, prev_ids.index_select(0, src_t))

    def _index_tensor(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _prepare(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, torch.Tensor, StepAttention, torch.Tensor]:
        bs = self.config.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        sample_idx: list[int] = []
        decode_idx: list[int] = []
        decode_tables: list[tuple[int, ...]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        on_device_rows: list[int] = []
        on_device_ids: list[str] = []
        prefill_tables: list[tuple[int, ...]] = []
        prefill_bounds: list[tuple[int, int, int]] = []
        for row in plan.rows:
            start, n = len(input_ids), row.num_new_tokens
            first = row.num_computed_tokens
            input_ids.extend(row.token_ids)
            if row.token_on_device:
                on_device_rows.append(start)
                on_device_ids.append(row.request_id)
                input_ids.append(0)  # overwritten on the device below
            pos = range(first, first + n)
            positions.extend(pos)
            table = row.block_table
            slot_blocks.extend(table[p // bs] for p in pos)
            if row.sample:
                sample_idx.append(start + n - 1)
            if n == 1:
                if prefills:
                    raise ValueError("StepPlan rows must list decode rows before prefill rows")
                decode_idx.append(start)
                decode_tables.append(table)
                decode_lens.append(first + 1)
            elif self.decode_kernel:  # the C kernel reads the pool: no mask, no table tensor
                prefills.append(PrefillSpan(start, start + n, first, _NO_TABLE, None))
                prefill_tables.append(table)
                prefill_bounds.append((start, n, first))
            else:
                prefills.append(self._prefill_span(start, row.num_computed_tokens, n, table))
        dev = self.device
        pos_t = torch.tensor(positions, dtype=torch.long)
        meta = AttentionMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long).to(dev),
            slot_offsets=(pos_t % bs).to(dev),
            num_decodes=len(decode_idx),
            decode_block_tables=_pad_tables(decode_tables, dev) if decode_idx else None,
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.long).to(dev),
            decode_kernel=self.decode_kernel,
            decode_mask=(
                _decode_mask(decode_lens, decode_tables, bs, dev)
                if decode_idx and not self.decode_kernel
                else None
            ),
            prefills=tuple(prefills),
            prefill_tables=_pad_tables(prefill_tables, dev) if prefill_tables else None,
            prefill_bounds=(
                torch.tensor(prefill_bounds, dtype=torch.long).to(dev) if prefill_bounds else None
            ),
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(dev)
        self._feed_on_device(ids_t, on_device_rows, on_device_ids)
        return (ids_t, pos_t.to(dev), meta, torch.tensor(sample_idx, dtype=torch.long).to(dev))

    def _prefill_span(
        self, start: int, num_computed: int, n: int, table: tuple[int, ...]
    ) -> PrefillSpan:
        if num_computed == 0:
            return PrefillSpan(start, start + n, 0, torch.empty(0, dtype=torch.long), None)
        context = num_computed + n
        num_blocks = -(-context // self.config.block_size)
        q_pos = torch.arange(num_computed, context).unsqueeze(1)  # [n, 1]
        k_pos = torch.arange(context).unsqueeze(0)  # [1, context]
        mask = (k_pos <= q_pos).view(1, 1, n, context)
        return PrefillSpan(
            start,
            start + n,
            num_computed,
            torch.tensor(table[:num_blocks], dtype=torch.long).to(self.device),
            mask.to(self.device),
        )


_NO_TABLE = torch.empty(0, dtype=torch.long)


def _pad_tables(tables: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
    width = max(len(t) for t in tables)
    padded = [list(t) + [0] * (width - len(t)) for t in tables]  # pad slots are masked out
    return torch.tensor(padded, dtype=torch.long).to(device)


def _decode_mask(
    lens: list[int], tables: list[tuple[int, ...]], bs: int, device: torch.device
) -> torch.Tensor:
    width = max(len(t) for t in tables) * bs
    k_pos = torch.arange(width).unsqueeze(0)  # [1, T]
    mask = k_pos < torch.tensor(lens).unsqueeze(1)  # [Bd, T]
    return mask.view(len(lens), 1, 1, width).to(device)
