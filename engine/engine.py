"""Engine: add requests, step (schedule -> execute -> update), report deltas. Single-threaded:
callers in other threads must hand requests over through their own queue.

Overlapped steps (config.async_scheduling, the CUDA default): one call of `step` schedules and
launches step N+1, then collects step N (the one host sync), updates the scheduler and returns
step N's outputs. The host's work for N+1 (scheduling, inputs) and for N (update, stop checks,
detokenising) thus runs while the GPU computes; the outputs come one step later. Same tokens as
the synchronous loop: a row of N+1 that needs N's token reads it on the device
(ScheduledRow.token_on_device), and a request that turns out finished at N had its row of N+1
computed for nothing (its result is dropped). See engine/scheduler.py for when a request waits
instead.

Hazard: blocks freed while a step is in flight (a finish or abort in between) may still get
that step's KV write for the freed request's next position. Steps on the one CUDA stream are
ordered after it; anything else that writes blocks (a remote KV write into `reserve_kv`'s
blocks) must wait for the step first, which `reserve_kv` does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.block_manager import BlockAccountingError, BlockCounts, BlockManager
from engine.config import EngineConfig
from engine.gpu_runner import GpuModelRunner
from engine.kv_reservation import KVReservation
from engine.model_runner import LaunchedStep, ModelRunner
from engine.outputs import RequestOutput
from engine.plan import StepPlan, StepResult, TokenLogprob
from engine.reference_runner import ReferenceModelRunner
from engine.request import FinishReason, Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.stats import StepStats, step_stats
from engine.text_stream import TextStream
from runtime.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class InFlight:
    """A launched step the engine has not collected yet."""

    plan: StepPlan
    launched: LaunchedStep


def runner_class(config: EngineConfig) -> type[ModelRunner]:
    """The model runner for the config's numerics and device."""
    if config.numerics == "reference":
        return ReferenceModelRunner
    return GpuModelRunner if config.device.startswith("cuda") else ModelRunner


class Engine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner_class(config)(
            config, tokenizer.vocab_size if tokenizer is not None else None
        )
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self.streams: dict[str, TextStream] = {}
        # decode role: requests whose blocks are reserved and whose KV is being written from
        # elsewhere, validated and built (prompt block hashes included) by reserve_kv so that
        # admit_prefilled, on the critical path once the KV landed, only flips them to running
        self.awaiting_kv: dict[str, Request] = {}
        self.last_step_stats: StepStats | None = None  # of the latest step() call
        self.in_flight: InFlight | None = None  # overlapped steps: launched, not collected
        self.eos_token_ids = frozenset(config.model.eos_token_ids) | (
            tokenizer.eos_token_ids if tokenizer is not None else frozenset()
        )

    # ---- intake ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        *,
        hold_kv_on_finish: bool = False,
        resume_output_token_ids: Sequence[int] = (),
    ) -> None:
        """Queue a request. Raises ValueError on anything the engine cannot serve.

        resume_output_token_ids: tokens the request already produced elsewhere (a migrated
        request). They count as its output (max_tokens, min_tokens, penalties, the position of
        seeded draws) and their text is fed to its text stream without being emitted, so the
        request goes on exactly as a preempted one recomputing here would: the first output is
        the next token.
        """
        req = self._new_request(request_id, prompt_token_ids, params, hold_kv_on_finish)
        resumed = tuple(int(t) for t in resume_output_token_ids)
        if resumed:
            self._check_resume(req, resumed)
            req.token_ids.extend(resumed)
        self._open_stream(req)
        stream = self.streams.get(request_id)
        if stream is not None:
            for token in resumed:  # one at a time, as they were produced: the same text state
                if stream.add([token])[1] is not None:
                    del self.streams[request_id]
                    raise ValueError("a stop string ends the resumed output: it had finished")
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        """Finish a queued or running request now and free its blocks, or free the blocks a
        finished one holds for a hand-off; unknown ids are ignored (the request may have
        finished in the meantime)."""
        req = self.scheduler.requests.get(request_id)
        if req is not None:
            self.scheduler.finish(req, FinishReason.ABORT)
            self.streams.pop(request_id, None)
        elif request_id in self.scheduler.held:
            # prefill role: it finished and its blocks wait for a hand-off, but whoever would
            # hand them off went away before it saw the finish (its caller was cancelled)
            self.scheduler.release_held(request_id)

    # ---- role hooks -------------------------------------------------------------------------
    def reserve_kv(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> KVReservation:
        """Decode role: blocks for a prompt whose KV someone else writes (ValueError for a
        request this engine would refuse, OutOfBlocks). The prompt's full blocks found in
        this engine's prefix cache are reused (KVReservation.num_hit_blocks): only the rest
        is written from elsewhere. The request is built now, while its KV is still being
        computed elsewhere, its blocks hashed up to the first miss (hash_awaiting_prompt
        hashes the rest, a separate command off the critical path); admit_prefilled only
        appends the first token and runs it.

        Waits for a step in flight first: it may still write a block freed meanwhile (see the
        module doc), and the remote write must land after it."""
        req = self._new_request(request_id, prompt_token_ids, params, False)
        if self.in_flight is not None:
            done = self.in_flight.launched.done
            if done is not None:
                done.synchronize()
        reservation = self.scheduler.reserve(req)
        req.status = RequestStatus.WAITING_FOR_KV
        self.awaiting_kv[request_id] = req
        return reservation

    def hash_awaiting_prompt(self, request_id: str) -> None:
        """Decode role: hash the full prompt blocks of a request reserve_kv built, so that
        admission need not (~0.3-0.8 ms for 3,000 tokens). A no-op when the reservation is
        gone (cancelled or admitted meanwhile: admission hashes what is missing itself)."""
        req = self.awaiting_kv.get(request_id)
        if req is not None and self.config.enable_prefix_caching:
            req.update_block_hashes(self.config.block_size)

    def cancel_kv_reservation(self, request_id: str) -> bool:
        """Decode role: give reserved blocks back; False when there are none (the request was
        admitted meanwhile, or the reservation never made)."""
        if self.awaiting_kv.pop(request_id, None) is not None and (
            request_id not in self.scheduler.requests
        ):
            # its text stream (first_token opened it); under the same id, a request added
            # since (the decode worker's local fallback) owns a stream of its own: kept
            self.streams.pop(request_id, None)
        return self.scheduler.cancel_reservation(request_id)

    def first_token(
        self,
        request_id: str,
        first_token_id: int,
        first_logprob: TokenLogprob | None = None,
    ) -> RequestOutput:
        """Decode role: the prefill side sampled `first_token_id` (and its logprob, when asked
        for); its KV may still be on its way. Returns that token's output, which may finish
        the request (EOS, max_tokens, a stop string): then it is never admitted and only
        cancel_kv_reservation is left (its reservation's one free path). Otherwise
        admit_prefilled runs it once the KV has landed. KeyError when nothing is reserved
        under `request_id`; ValueError when its first token was given already."""
        req = self.awaiting_kv[request_id]
        if req.num_output_tokens:
            raise ValueError(f"{request_id}: its first token was given already")
        req.token_ids.append(first_token_id)
        req.arrival_s = req.scheduled_s = time.monotonic()  # it never queues here
        self._open_stream(req)
        if first_token_id in req.stop_token_ids:
            self.scheduler.finish(req, FinishReason.STOP, stop_reason=first_token_id)
        elif req.num_output_tokens >= req.max_tokens:
            self.scheduler.finish(req, FinishReason.LENGTH)
        logprobs = {request_id: first_logprob} if first_logprob is not None else {}
        (output,) = self._outputs([req], StepResult({request_id: first_token_id}, logprobs))
        return output

    def admit_prefilled(self, request_id: str) -> None:
        """Decode role: the prompt's KV has landed in the blocks reserve_kv gave, and
        first_token gave the first token without finishing the request: it runs from the
        next step on (its second token). KeyError when nothing is reserved under
        `request_id`; ValueError when it has no first token yet, or finished with it."""
        req = self.awaiting_kv[request_id]
        if req.num_output_tokens != 1 or req.is_finished:
            why = "finished with its first token" if req.is_finished else "has no first token"
            raise ValueError(f"{request_id}: not admitted: it {why}")
        self.scheduler.admit_prefilled(req)
        del self.awaiting_kv[request_id]

    def release_kv(self, request_id: str) -> None:
        """Prefill role: the hand-off is done (or failed); free the held blocks."""
        self.scheduler.release_held(request_id)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. Sets `last_step_stats` (for a metrics exporter): None when it was empty.

        Overlapped: launches the next step and returns the outputs of the one before."""
        if self.config.async_scheduling:
            return self._step_overlapped()
        started_s = time.monotonic()
        self.last_step_stats = None
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        row_requests = [self.scheduler.requests[row.request_id] for row in plan.rows]
        result = self.runner.execute(plan)
        touched = self.scheduler.update(plan, result)
        outputs = self._outputs(touched, result)
        self.last_step_stats = step_stats(plan, row_requests, started_s, time.monotonic())
        return outputs

    def _step_overlapped(self) -> list[RequestOutput]:
        started_s = time.monotonic()
        self.last_step_stats = None
        plan = self.scheduler.schedule()
        launched = None
        row_requests = []
        if not plan.is_empty:
            row_requests = [self.scheduler.requests[row.request_id] for row in plan.rows]
            launched = self.runner.launch(plan)
        outputs: list[RequestOutput] = []
        previous, self.in_flight = self.in_flight, None
        if previous is not None:
            result = self.runner.collect(previous.launched)
            touched = self.scheduler.update(previous.plan, result)
            outputs = self._outputs(touched, result)
        if launched is not None:
            self.in_flight = InFlight(plan, launched)
            self.last_step_stats = step_stats(plan, row_requests, started_s, time.monotonic())
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.in_flight is not None

    def check_integrity(self) -> None:
        """Raise BlockAccountingError unless every block's ref count matches its holders."""
        self.block_manager.check_integrity(self.scheduler.block_holders())

    def audit_blocks(self) -> tuple[BlockCounts, str, list[str]]:
        """The block counts, what `check_integrity` finds wrong ("": nothing) and who holds
        blocks (see Scheduler.block_holders). O(num_blocks); for tests and operators after a
        fault, not the step path."""
        holders = self.scheduler.block_holders()
        owners = sorted(name for name, table in holders.items() if table)
        try:
            self.block_manager.check_integrity(holders)
        except BlockAccountingError as e:
            return self.block_manager.counts(), str(e), owners
        return self.block_manager.counts(), "", owners

    # ---- helpers ----------------------------------------------------------------------------
    def _new_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        hold_kv_on_finish: bool,
    ) -> Request:
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt, room = self.check_request(prompt_token_ids, params)
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt,
            params=params,
            max_tokens=room if params.max_tokens is None else min(params.max_tokens, room),
            stop_token_ids=eos | frozenset(params.stop_token_ids),
            arrival_s=time.monotonic(),
            hold_kv_on_finish=hold_kv_on_finish,
        )

    def check_request(
        self, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> tuple[tuple[int, ...], int]:
        """Raise ValueError for anything this engine cannot serve; changes nothing.

        Returns the prompt as a tuple and the room left for output tokens.
        """
        if params.n != 1:
            raise ValueError("the engine takes n == 1; expand n > 1 into separate requests")
        prompt = tuple(map(int, prompt_token_ids))  # C loops: ~10x the generator's speed
        vocab = self.config.model.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in (*params.logit_bias, *params.stop_token_ids)):
            raise ValueError(f"logit_bias and stop_token_ids must name ids in [0, {vocab})")
        room = self.config.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; this model's context is "
                f"{self.config.max_model_len}, which leaves no room for output"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        return prompt, room

    def _check_resume(self, req: Request, resumed: tuple[int, ...]) -> None:
        vocab = self.config.model.vocab_size
        if any(not 0 <= t < vocab for t in resumed):
            raise ValueError(f"resumed output token ids must be in [0, {vocab})")
        if len(resumed) >= req.max_tokens:
            raise ValueError(
                f"{len(resumed)} resumed output tokens leave no room under max_tokens "
                f"{req.max_tokens}"
            )
        ended = [t for t in resumed[req.params.min_tokens :] if t in req.stop_token_ids]
        if ended:
            raise ValueError(f"resumed output holds stop token {ended[0]}: it had finished")

    def _open_stream(self, req: Request) -> None:
        if self.tokenizer is not None:
            self.streams[req.request_id] = TextStream(
                self.tokenizer,
                req.prompt_token_ids,
                req.params.stop,
                req.params.include_stop_str_in_output,
                req.params.skip_special_tokens,
            )

    def _outputs(self, reqs: list[Request], result: StepResult) -> list[RequestOutput]:
        outputs = []
        for req in reqs:
            token = req.token_ids[-1]
            text = ""
            stream = self.streams.get(req.request_id)
            if stream is not None:
                text, stop_str = stream.add([token])
                if stop_str is not None:
                    # the stop string wins even over an EOS sampled in the same step
                    self.scheduler.finish(req, FinishReason.STOP, stop_reason=stop_str)
                    req.finish_reason, req.stop_reason = FinishReason.STOP, stop_str
                elif req.is_finished:
                    text += stream.finish()
                if req.is_finished:
                    del self.streams[req.request_id]
            logprob: TokenLogprob | None = result.logprobs.get(req.request_id)
            outputs.append(
                RequestOutput(
                    request_id=req.request_id,
                    new_token_ids=(token,),
                    new_logprobs=(logprob,) if logprob is not None else (),
                    text_delta=text,
                    finished=req.is_finished,
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_cached_tokens=req.num_cached_tokens,
                    held_block_ids=tuple(self.scheduler.held.get(req.request_id, ())),
                )
            )
        return outputs
