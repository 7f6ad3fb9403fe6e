"""Scheduler: token-budget continuous batching with chunked prefill, prefix caching and
preemption by recompute. Decides; never touches tensors.

There is no prefill or decode phase: every running request has `num_tokens` and
`num_computed_tokens`, and a step gives each some of the token budget to close the gap
(1 token for a decoding request, a chunk for a prefilling one), as vLLM v1 does.

Overlapped steps (engine/engine.py, GPU): the engine schedules step N+1 before it has read the
tokens of step N. A request that samples in a scheduled step gets a pending token
(`Request.num_pending_tokens`) at once; the next plan gives it a decode row with
`token_on_device` (the runner feeds that token on the device) and counts the pending token in
its output position. `update` then runs one step late: it appends the token, or drops the
result of a request that finished, was aborted or was preempted meanwhile. A request runs
ahead only when its next row cannot depend on the unread token (no penalties, which need the
output ids on the host; not at max_tokens / max_model_len, where it will finish; not one whose
blocks are held for a hand-off); otherwise it skips a step. With no step in flight (the
synchronous loop) there are never pending tokens and all of this is inert.

TP-invariant mode (EngineConfig.tp_invariant_shards) also needs each row's bits independent of
the other rows of its step: cuBLAS picks GEMM kernels by M (the step's token count) as well. A
decode step is batch-invariant on the GPU (one CUDA-graph bucket of max_num_seqs rows in that
mode); a prefill chunk is made so here: in this mode it runs alone in its step (M = its own chunk
length, which depends on the token budget and its prefix hits only), and prefill and decode
steps alternate while both have work. Hazard: a preempted request's recompute is one chunk as
well, but its outputs' KV then comes from a prefill GEMM rather than from decode steps.

Role hooks (the engine is role-neutral; the workers pick):
  - prefill role: a request added with hold_kv_on_finish keeps its blocks after it finishes,
    until `release_held` (the KV hand-off is done);
  - decode role: `reserve` blocks for a request whose KV is computed elsewhere (its own
    prefix-cache hits first: only the rest is written from elsewhere), then
    `admit_prefilled` it straight into the running set.
"""

from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager, OutOfBlocks
from engine.config import EngineConfig
from engine.kv_reservation import KVReservation
from engine.plan import ScheduledRow, StepPlan, StepResult
from engine.request import FinishReason, Request, RequestStatus


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_size = config.block_size
        self.bm = block_manager
        self.waiting: deque[Request] = deque()  # hold no blocks
        self.running: list[Request] = []  # hold blocks; admission order (last = first victim)
        self.requests: dict[str, Request] = {}  # every unfinished request, by id
        self.reserved: dict[str, list[int]] = {}  # decode role: blocks awaiting remote KV
        self.held: dict[str, list[int]] = {}  # prefill role: finished, blocks pinned
        self.num_preemptions = 0
        # TP-invariant mode: one prefill chunk per step, alone (see the module doc)
        self.isolate_prefill = config.tp_invariant_shards is not None
        self._prefill_turn = False  # that mode: the last step was a prefill step

    # ---- intake -------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def reserve(self, req: Request) -> KVReservation:
        """Blocks for the prompt of `req`, whose KV another process will write: this engine's
        prefix-cache hits (acquired, as _admit does; never the block of the last prompt
        token) followed by new blocks.

        Raises OutOfBlocks, changing nothing. The caller owns the reservation until
        admit_prefilled or cancel_reservation (the one free path of every entry, hit or new).
        """
        if req.request_id in self.reserved or req.request_id in self.requests:
            raise ValueError(f"request {req.request_id!r} already exists")
        hits = self._prefix_hits(req)
        need = self._blocks_for(req.num_prompt_tokens) - len(hits)
        if not self.bm.can_allocate(need, hits):
            raise OutOfBlocks(
                f"a reservation of {need} new blocks ({len(hits)} prefix hits); "
                f"{self.bm.num_free_blocks} free or evictable of {self.bm.num_blocks}"
            )
        self.bm.acquire(hits)
        blocks = hits + self.bm.allocate(need)
        # the hits are committed already: admission commits from the first written block on
        req.num_committed_blocks = len(hits)
        req.num_cached_tokens = len(hits) * self.block_size
        self.reserved[req.request_id] = blocks
        return KVReservation(tuple(blocks), len(hits))

    def cancel_reservation(self, request_id: str) -> bool:
        """Free a reservation; False when there is none (admitted or never made)."""
        blocks = self.reserved.pop(request_id, None)
        if blocks is None:
            return False
        self.bm.free(blocks)
        return True

    def admit_prefilled(self, req: Request) -> None:
        """Admit a request whose prompt KV already sits in its reserved blocks.

        req.token_ids is prompt + the first token sampled by the prefill side.
        """
        blocks = self.reserved.pop(req.request_id)
        if len(blocks) < self._blocks_for(req.num_prompt_tokens):
            self.reserved[req.request_id] = blocks
            raise ValueError(f"{req.request_id}: reservation too small for the prompt")
        req.block_table = blocks
        req.num_computed_tokens = req.num_prompt_tokens
        req.status = RequestStatus.RUNNING
        self._commit_full_blocks(req)
        self.requests[req.request_id] = req
        self.running.append(req)

    # ---- the decision ---------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        preempted: list[str] = []
        prefill_step = self._prefill_step() if self.isolate_prefill else False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending_tokens and not self._can_run_ahead(req):
                i += 1  # waits for its pending token's result (read by the next update)
                continue
            if self.isolate_prefill and (
                _prefilling(req) is not prefill_step or (rows and prefill_step)
            ):
                i += 1  # another kind of step, or this prefill step has its one chunk
                continue
            n = min(req.num_tokens_with_pending - req.num_computed_tokens, budget)
            need = self._blocks_for(req.num_computed_tokens + n) - len(req.block_table)
            while need > 0 and not self.bm.can_allocate(need):
                victim = self.running.pop()  # the latest admitted goes first
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            if need > 0:
                req.block_table.extend(self.bm.allocate(need))
            rows.append(self._row(req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            if self.isolate_prefill and (not prefill_step or rows):
                break
            req = self.waiting[0]
            chunk = self._admit(req, budget)
            if chunk is None:
                break
            self.waiting.popleft()
            self.running.append(req)
            rows.append(self._row(req, chunk))
            budget -= chunk
        rows.sort(key=lambda r: r.num_new_tokens != 1)  # decode rows first, stable otherwise
        for row in rows:  # the plan will run: its KV will be there, its samples pending
            req = self.requests[row.request_id]
            req.num_computed_tokens += row.num_new_tokens
            req.num_pending_tokens += row.sample
        return StepPlan(tuple(rows), tuple(preempted))

    def _prefill_step(self) -> bool:
        """TP-invariant mode: is this step a prefill step (one chunk, alone)? Alternates with
        decode steps while both kinds have work."""
        prefill = bool(self.waiting) or any(_prefilling(r) for r in self.running)
        decode = any(not _prefilling(r) for r in self.running)
        self._prefill_turn = prefill and (not decode or not self._prefill_turn)
        return self._prefill_turn

    def _can_run_ahead(self, req: Request) -> bool:
        """May `req` be scheduled while its pending token is unread (see the module doc)?"""
        num_output = req.num_output_tokens + req.num_pending_tokens
        return (
            not req.params.needs_penalties
            and not req.hold_kv_on_finish
            and num_output < req.max_tokens
            and req.num_tokens_with_pending < self.config.max_model_len
        )

    def _admit(self, req: Request, budget: int) -> int | None:
        """Give a waiting request its prefix-cache hits and blocks for its first chunk.

        Returns the chunk length, or None (nothing changed) when the blocks are not there.
        """
        hits = self._prefix_hits(req)
        num_cached = len(hits) * self.block_size
        n = min(req.num_tokens - num_cached, budget)
        need = self._blocks_for(num_cached + n) - len(hits)
        if not self.bm.can_allocate(need, hits):
            return None
        self.bm.acquire(hits)
        req.block_table = hits + self.bm.allocate(need)
        req.num_computed_tokens = num_cached
        req.num_committed_blocks = len(hits)
        if req.num_preemptions == 0:
            req.num_cached_tokens = num_cached
        req.status = RequestStatus.RUNNING
        return n

    def _prefix_hits(self, req: Request) -> list[int]:
        """Cached blocks holding a prefix of req.token_ids (not acquired yet). Mutates nothing
        but req's block hashes, computed up to the first miss only (cost ~ hits + 1 blocks;
        a fresh 3,000-token prompt hashed whole costs ~0.3-0.8 ms, on a remote prefill's
        critical path in reserve): the rest are hashed when its blocks are committed, or by
        Engine.hash_awaiting_prompt while a reservation waits for its KV."""
        if not self.config.enable_prefix_caching:
            return []
        # the last token is always computed: its logits give the next token
        usable = (req.num_tokens - 1) // self.block_size
        return self.bm.match_prefix(req.lazy_block_hashes(self.block_size, usable))

    def _preempt(self, req: Request) -> None:
        """Recompute later: drop the blocks (their committed prefix stays cached) and requeue."""
        self.bm.free(req.block_table)
        req.block_table = []
        req.num_computed_tokens = 0
        req.num_committed_blocks = 0
        req.num_pending_tokens = 0  # an in-flight sample of it is dropped by update
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _row(self, req: Request, n: int) -> ScheduledRow:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens_with_pending
        # a pending token is always the last one and only ever computed alone (a decode row):
        # the tokens before it were all computed by the step that sampled it
        on_device = req.num_pending_tokens > 0
        assert not on_device or (n == 1 and start == req.num_tokens), "pending row not decode"
        num_output = req.num_output_tokens + req.num_pending_tokens
        sp = req.params
        penalty = None
        if sample and sp.needs_penalties:
            penalty = (req.prompt_token_ids, tuple(req.output_token_ids))
        banned: tuple[int, ...] = ()
        if sample and num_output < sp.min_tokens:
            banned = tuple(sorted(req.stop_token_ids))
        return ScheduledRow(
            request_id=req.request_id,
            token_ids=() if on_device else tuple(req.token_ids[start : start + n]),
            num_computed_tokens=start,
            block_table=tuple(req.block_table),
            sample=sample,
            sampling=sp,
            num_output_tokens=num_output,
            penalty_context=penalty,
            banned_token_ids=banned,
            token_on_device=on_device,
        )

    # ---- after the forward pass -----------------------------------------------------------
    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """The step that ran `plan` is over: commit full blocks, append sampled tokens, finish
        on EOS/stop id/length. Returns the requests that got a token (finished ones included).

        Rows of requests that are gone (finished or aborted since `plan` was scheduled) or no
        longer running (preempted since: they recompute) are dropped: only possible when a
        later step was scheduled before this update (overlapped steps).
        """
        touched: list[Request] = []
        for row in plan.rows:
            req = self.requests.get(row.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue
            self._commit_full_blocks(req)
            if not row.sample:
                continue
            token = result.sampled_token_ids[row.request_id]
            req.num_pending_tokens -= 1
            req.token_ids.append(token)
            self._commit_full_blocks(req)  # the token may complete a block computed earlier
            touched.append(req)
            if token in req.stop_token_ids:  # never sampled before min_tokens (banned)
                self.finish(req, FinishReason.STOP, stop_reason=token)
            elif (
                req.num_output_tokens >= req.max_tokens
                or req.num_tokens >= self.config.max_model_len
            ):
                self.finish(req, FinishReason.LENGTH)
        return touched

    def _commit_full_blocks(self, req: Request) -> None:
        if not self.config.enable_prefix_caching:
            return
        # a block is committed once its KV is scheduled and its tokens are known on the host
        # (a block holding a pending token waits; the KV of a step still in flight is written
        # before any later step reads it: one CUDA stream)
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.block_size
        if num_full <= req.num_committed_blocks:
            return
        req.update_block_hashes(self.block_size)
        for j in range(req.num_committed_blocks, num_full):
            self.bm.commit(req.block_table[j], req.block_hashes[j])
        req.num_committed_blocks = num_full

    # ---- endings ----------------------------------------------------------------------------
    def finish(
        self, req: Request, reason: FinishReason, stop_reason: str | int | None = None
    ) -> None:
        """The one free path for a request's blocks (or the hand-over to `held`)."""
        if req.status is RequestStatus.FINISHED:
            return
        if req.status is RequestStatus.WAITING_FOR_KV:
            # finished by the prefill side's first token, never admitted: its blocks are a
            # reservation, which cancel_reservation frees (their one free path)
            req.status = RequestStatus.FINISHED
            req.finish_reason, req.stop_reason = reason, stop_reason
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        del self.requests[req.request_id]
        if req.hold_kv_on_finish and reason is not FinishReason.ABORT and req.block_table:
            self.held[req.request_id] = req.block_table
        elif req.block_table:
            self.bm.free(req.block_table)
        req.block_table = []

    def release_held(self, request_id: str) -> None:
        self.bm.free(self.held.pop(request_id))

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- accounting -------------------------------------------------------------------------
    def block_holders(self) -> dict[str, list[int]]:
        holders = {r.request_id: r.block_table for r in self.running}
        holders.update({f"reserved:{k}": v for k, v in self.reserved.items()})
        holders.update({f"held:{k}": v for k, v in self.held.items()})
        return holders

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)


def _prefilling(req: Request) -> bool:
    """More than its next token to compute, or its prompt not all computed yet."""
    computed = req.num_computed_tokens
    return computed < req.num_tokens_with_pending - 1 or computed < req.num_prompt_tokens
