"""Frontend: a validated OpenAI request -> routed choices -> worker streams -> OpenAI responses.

The request path, in order (all on the event loop thread):

    plan_completion / plan_chat   validate, tokenize, check the context, route once per prompt
    collect / stream              one Generate stream per choice, merged by choice index
    _choice_deltas                ticket accounting, metrics, cancel + Abort when cut short

Router overhead (tandem_router_overhead_seconds, docs/metrics.md) is the wall time the router
works on a request outside awaiting its workers, as a sum of segments that contain no await:
    dispatch   arrival (its body is whole: router/guard.py) -> its first Generate call issued
               (the request's own task all the way, no hop through the event loop; CPU:
               planning, then _attempt from its start up to the call)
    relay      each worker message, from the moment its read returns to the router -> its SSE
               bytes handed to the client's socket (router/sse.py; non-streamed: accumulated,
               plus building the final body)
Not in it: gRPC's own receive path before a read returns, and time a ready message waits for the
event loop behind other requests' work (both show in TTFT/ITL, not here). The same segments are
also summed in CPU seconds of the event-loop thread (tandem_router_overhead_cpu_seconds): wall
minus CPU is the time the router was runnable but descheduled (a loaded machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import tandem_pb2 as pb
from router import convert
from router.admission import Admission, Slot
from router.config import RouterConfig
from router.convert import Delta
from router.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RouterError,
    ServiceUnavailable,
    WorkerFailed,
)
from router.logprobs import TokenStrings
from router.metrics import RouterMetrics
from router.migration import (
    ROUTE_POLL_S,
    ROUTE_WAIT_S,
    Progress,
    WorkerLost,
    continuation_route,
    migratable,
)
from router.policy import RouteDecision, RouteRequest, Unroutable, route
from router.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from router.registry import WorkerRegistry
from runtime.tokenizer import ChatTemplateError, Tokenizer

log = logging.getLogger(__name__)


class Endpoint(enum.Enum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True, slots=True)
class Choice:
    """One OpenAI choice: its own worker request."""

    index: int  # OpenAI's choice index: prompt_index * n + i
    prompt_index: int
    request_id: str  # propagated to the workers
    prompt_ids: Sequence[int]
    sampling: pb.SamplingParams
    decision: RouteDecision


TIMING_KEY = "tandem.timing"  # ASGI scope key of the request's Timing (set by router/guard.py)


@dataclass(slots=True)
class Timing:
    """One request's clock; overhead as defined in the module docstring."""

    arrival_s: float  # perf_counter at arrival: the body is whole (router/guard.py)
    arrival_cpu_s: float  # time.thread_time() then
    overhead_s: float = 0.0  # router wall time so far
    overhead_cpu_s: float = 0.0  # event-loop thread CPU time over the same segments
    first_token_s: float | None = None

    @classmethod
    def now(cls) -> Timing:
        return cls(time.perf_counter(), time.thread_time())

    def planned(self) -> None:
        """Planning (validate, tokenize, route) ends; it ran with no await since arrival."""
        self.overhead_cpu_s += time.thread_time() - self.arrival_cpu_s

    def dispatched(self, since_cpu_s: float) -> float:
        """The first Generate call is issued by a task that started at `since_cpu_s`; returns
        the dispatch wall time (arrival to now), which counts into the overhead."""
        dispatch_s = time.perf_counter() - self.arrival_s
        self.overhead_s += dispatch_s
        self.overhead_cpu_s += time.thread_time() - since_cpu_s
        return dispatch_s

    def add_segment(self, since_s: float, since_cpu_s: float) -> None:
        """Router work from a (perf_counter, thread_time) stamp until now, with no await between
        (so the CPU delta is this request's own)."""
        self.overhead_s += time.perf_counter() - since_s
        self.overhead_cpu_s += time.thread_time() - since_cpu_s


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated, routed request: everything needed to run and format it."""

    endpoint: Endpoint
    request_id: str
    created: int  # unix seconds
    model: str
    choices: tuple[Choice, ...]
    prompt_lens: tuple[int, ...]  # tokens per prompt
    stream: bool
    include_usage: bool
    logprobs: bool  # format logprobs into the response
    timing: Timing = field(compare=False)
    slot: Slot = field(compare=False)  # its admitted choices, released by finish_timing

    def route_header(self) -> str:
        decisions = {c.prompt_index: c.decision for c in self.choices}
        return " | ".join(decisions[i].header_value() for i in sorted(decisions))


@dataclass(slots=True)
class _ChoiceStats:
    """Latency bookkeeping of one choice across its attempts (perf_counter seconds)."""

    first_token_s: float | None = None
    last_token_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # per token; observed once at the end
    finished: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    """One worker message for one choice, stamped when it came off the wire."""

    choice: Choice
    delta: Delta
    received_s: float  # perf_counter
    received_cpu_s: float  # time.thread_time()


class Frontend:
    def __init__(
        self,
        config: RouterConfig,
        tokenizer: Tokenizer,
        registry: WorkerRegistry,
        metrics: RouterMetrics,
        admission: Admission,
    ) -> None:
        self.config = config
        self.admission = admission
        self.tokenizer = tokenizer
        self.registry = registry
        self.metrics = metrics
        self.token_strings = TokenStrings(tokenizer)
        self._seq = 0
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ planning (no awaits)

    def plan_completion(self, req: CompletionRequest, timing: Timing) -> Plan:
        self._check_model(req.model)
        convert.validate_sampling(req, self.tokenizer.vocab_size)
        convert.validate_completion(req)
        prompts = self._completion_prompts(req.prompt)
        logprobs = req.logprobs
        max_tokens = convert.completion_max_tokens(req, self.config.limits)
        return self._plan(
            Endpoint.COMPLETIONS, req, prompts, max_tokens, "max_tokens", logprobs, timing
        )

    def plan_chat(self, req: ChatCompletionRequest, timing: Timing) -> Plan:
        self._check_model(req.model)
        convert.validate_sampling(req, self.tokenizer.vocab_size)
        convert.validate_chat(req)
        messages = [_template_message(m.model_dump(exclude_none=True)) for m in req.messages]
        try:
            ids = self.tokenizer.encode_chat(
                messages, req.add_generation_prompt, **(req.chat_template_kwargs or {})
            )
        except ChatTemplateError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        max_tokens: int | None
        if req.max_completion_tokens is not None:
            max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = req.max_tokens, "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return self._plan(Endpoint.CHAT, req, [ids], max_tokens, param, logprobs, timing)

    def _plan(
        self,
        endpoint: Endpoint,
        req: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        max_tokens_param: str,
        logprobs: int | None,
        timing: Timing,
    ) -> Plan:
        max_model_len = self.config.max_model_len or self.registry.max_model_len()
        if max_model_len is None:
            raise ServiceUnavailable("no healthy decode worker")
        prefix = "cmpl-" if endpoint is Endpoint.COMPLETIONS else "chatcmpl-"
        prompt_param = "prompt" if endpoint is Endpoint.COMPLETIONS else "messages"
        request_id = f"{prefix}{uuid.uuid4().hex}"
        num_choices = len(prompts) * req.n
        convert.check_num_choices(num_choices, self.config.limits)
        # every prompt is validated before any is routed: a 400 never counts as a route
        samplings = [
            [
                convert.sampling_to_proto(
                    req,
                    max_tokens=convert.resolve_max_tokens(
                        max_tokens,
                        len(ids),
                        max_model_len,
                        self.config.limits,
                        max_tokens_param,
                        prompt_param,
                    ),
                    logprobs=logprobs,
                    seed=convert.child_seed(req.seed, i),
                )
                for i in range(req.n)
            ]
            for ids in prompts
        ]
        choices: list[Choice] = []
        slot = Slot()
        try:
            for p, ids in enumerate(prompts):
                decision = self._route(ids, slot, req.n)
                for i, sampling in enumerate(samplings[p]):
                    index = p * req.n + i
                    rid = request_id if num_choices == 1 else f"{request_id}-{index}"
                    choices.append(Choice(index, p, rid, ids, sampling, decision))
        except BaseException:
            self.admission.release(slot)
            raise
        self.metrics.admitted.inc()
        timing.planned()
        return Plan(
            endpoint=endpoint,
            request_id=request_id,
            created=int(time.time()),
            model=self.config.served_model_name,
            choices=tuple(choices),
            prompt_lens=tuple(len(ids) for ids in prompts),
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            logprobs=logprobs is not None,
            timing=timing,
            slot=slot,
        )

    def _route(self, prompt_ids: list[int], slot: Slot, num_choices: int) -> RouteDecision:
        """Route one prompt's `num_choices` choices and charge them to the admission slot."""
        self._seq += 1
        request = RouteRequest(len(prompt_ids), self.registry.overlaps(prompt_ids), self._seq)
        try:
            snapshot = self.admission.open_workers(self.registry.snapshot())
        except Overloaded:
            self.metrics.shed.labels("saturated").inc()
            raise
        try:
            decision = route(request, snapshot, self.config.mode, self.config.policy)
        except Unroutable as exc:
            raise ServiceUnavailable(str(exc)) from exc
        self.admission.charge(slot, decision.decode_worker_id, num_choices)
        prefilled_on = decision.prefill_worker_id or decision.decode_worker_id
        self.metrics.routes.labels(
            decision.mode.value,
            "remote" if decision.remote_prefill else "local",
            decision.cause.value,
        ).inc()
        blocks = len(prompt_ids) // self.registry.block_size(prefilled_on)
        self.metrics.prefix_query_blocks.labels(prefilled_on).inc(blocks)
        self.metrics.prefix_hit_blocks.labels(prefilled_on).inc(decision.overlap_blocks)
        return decision

    def _check_model(self, model: str) -> None:
        if model != self.config.served_model_name:
            raise ModelNotFound(model, self.config.served_model_name)

    def _completion_prompts(
        self, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[list[int]]:
        vocab = self.tokenizer.vocab_size
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        elif isinstance(prompt[0], str):
            prompts = [self.tokenizer.encode(p) for p in prompt if isinstance(p, str)]
        elif isinstance(prompt[0], int):
            prompts = [[t for t in prompt if isinstance(t, int)]]
        else:
            prompts = [list(p) for p in prompt if isinstance(p, list)]
        for ids in prompts:
            convert.check_prompt_ids(ids, vocab, "prompt")
        return prompts

    # ------------------------------------------------------------ running

    def events(self, plan: Plan) -> AsyncIterator[Event]:
        """Every choice's worker messages, interleaved as they arrive; the last one per choice
        has a finish_reason. Closing the iterator early cancels (and aborts) what is left.
        One choice: its own iterator, no hop through a merging generator (hot path)."""
        if len(plan.choices) == 1:
            return self._choice_events(plan, plan.choices[0])
        return self._merged(plan)

    async def _merged(self, plan: Plan) -> AsyncIterator[Event]:
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for event in self._choice_events(plan, choice):
                    queue.put_nowait(event)
                queue.put_nowait(None)
            except Exception as exc:
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(pump(c)) for c in plan.choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice_events(self, plan: Plan, choice: Choice) -> AsyncIterator[Event]:
        """One choice's events, across migrations (router/migration.py) when its decode worker
        is lost mid-stream."""
        deadline_s = time.time() + self.config.request_timeout_s  # unix; kept across attempts
        progress = Progress()
        stats = _ChoiceStats()
        decision = choice.decision
        try:
            while True:
                try:
                    async for event in self._attempt(
                        plan, choice, decision, progress, stats, deadline_s
                    ):
                        yield event
                    return
                except WorkerLost as lost:
                    if progress.migrations >= self.config.migration_limit:
                        self.metrics.migrations.labels("limit").inc()
                        log.warning(
                            "%s: decode worker %s lost (%s); migration limit %d reached",
                            choice.request_id, lost.worker_id, lost.error.message,
                            self.config.migration_limit,
                        )  # fmt: skip
                        raise lost.error from lost
                    decision = await self._continuation(choice, progress, lost)
                    self.admission.move(plan.slot, lost.worker_id, decision.decode_worker_id)
                    progress.migrations += 1
                    self.metrics.migrations.labels("migrated").inc()
                    log.warning(
                        "%s: decode worker %s lost (%s); migrated to %s after %d tokens",
                        choice.request_id, lost.worker_id, lost.error.message,
                        decision.decode_worker_id, len(progress.output_token_ids),
                    )  # fmt: skip
        finally:
            for gap_s in stats.gaps_s:
                self.metrics.itl_s.observe(gap_s)
            if stats.finished and stats.first_token_s is not None:
                ttft_s = stats.first_token_s - plan.timing.arrival_s
                self.metrics.observe_choice(ttft_s, stats.gaps_s)

    async def _continuation(
        self, choice: Choice, progress: Progress, lost: WorkerLost
    ) -> RouteDecision:
        """The decode worker the choice goes on on; waits up to ROUTE_WAIT_S for one."""
        ids = [*choice.prompt_ids, *progress.output_token_ids]
        loop = asyncio.get_running_loop()
        give_up_s = loop.time() + ROUTE_WAIT_S
        while True:
            self._seq += 1
            try:
                return continuation_route(
                    choice.prompt_ids,
                    progress,
                    self.registry.overlaps(ids),
                    self.registry.snapshot(),
                    lost,
                    self._seq,
                    self.config.policy,
                )
            except Unroutable as exc:
                if loop.time() >= give_up_s:
                    self.metrics.migrations.labels("unroutable").inc()
                    raise ServiceUnavailable(
                        f"{lost.error.message}; no decode worker to migrate to: {exc}"
                    ) from exc
                await asyncio.sleep(ROUTE_POLL_S)

    async def _attempt(
        self,
        plan: Plan,
        choice: Choice,
        decision: RouteDecision,
        progress: Progress,
        stats: _ChoiceStats,
        deadline_s: float,
    ) -> AsyncIterator[Event]:
        """One Generate stream of the choice; raises WorkerLost when migration may repair it."""
        start_cpu_s = time.thread_time()
        worker_id = decision.decode_worker_id
        client = self.registry.client(worker_id)
        request = convert.generate_request(
            choice.request_id,
            choice.prompt_ids,
            choice.sampling,
            decision.prefill_worker_id,
            decision.prefill_address,
            deadline_s,
            # non-streamed: the first token (TTFT, prefill accounting) and the rest at the end
            self.config.stream_interval if plan.stream else choice.sampling.max_tokens,
        )
        resumed = len(progress.output_token_ids)
        request.resume_output_token_ids.extend(progress.output_token_ids)
        num_context = len(choice.prompt_ids) + resumed
        ticket = self.registry.begin(choice.request_id, decision, num_context)
        timing = plan.timing
        call = client.generate(request, timeout_s=max(deadline_s - time.time(), 0.001))
        if choice.index == 0 and progress.migrations == 0:
            self.metrics.dispatch_s.observe(timing.dispatched(start_cpu_s))
        finished = lost = False
        try:
            async for msg in call:  # waiting here is worker time
                now = time.perf_counter()
                now_cpu = time.thread_time()
                delta = convert.delta_from_proto(msg)
                self.registry.add_tokens(ticket, len(delta.token_ids))
                # counted as they arrive: the finally below runs only when the consumer resumes
                # or closes this generator, which may be after the response is complete
                self.metrics.generation_tokens.inc(len(delta.token_ids))
                if delta.token_ids:
                    if stats.last_token_s is None:
                        stats.first_token_s = now
                        if timing.first_token_s is None:
                            timing.first_token_s = now
                            self.metrics.ttft_s.observe(now - timing.arrival_s)
                    else:
                        gap_s = (now - stats.last_token_s) / len(delta.token_ids)
                        stats.gaps_s.extend([gap_s] * len(delta.token_ids))
                    stats.last_token_s = now
                    progress.output_token_ids.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    finished = stats.finished = True
                    self._on_finished(delta.finish_reason, delta.usage)
                yield Event(choice, delta, now, now_cpu)
                if finished:
                    return
            lost = True
            raise WorkerLost(
                worker_id,
                decision.decode_address,
                WorkerFailed(
                    f"decode worker {worker_id} ended {choice.request_id} without a finish reason"
                ),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAVAILABLE:
                self.registry.mark_unreachable(worker_id, str(exc.details()))
            error = _rpc_error(exc, worker_id)
            if migratable(exc.code()):
                lost = True
                raise WorkerLost(worker_id, decision.decode_address, error) from exc
            raise error from exc
        finally:
            self.registry.finish(ticket)
            if not finished:
                call.cancel()
                if not lost:  # a lost worker has nothing left to abort
                    self._abort(worker_id, choice.request_id)

    def _on_finished(self, reason: convert.FinishReason, usage: convert.Usage | None) -> None:
        self.metrics.finished.labels(reason.value).inc()
        if usage is not None:
            self.metrics.prompt_tokens.inc(usage.prompt_tokens)
            self.metrics.cached_prompt_tokens.inc(usage.cached_tokens)
            self.metrics.request_prompt_tokens.observe(usage.prompt_tokens)
            self.metrics.request_generation_tokens.observe(usage.completion_tokens)

    def _abort(self, worker_id: str, request_id: str) -> None:
        """Best effort, in the background: cancelling the stream already tells the worker."""
        self.metrics.aborts.labels("cut_short").inc()
        task = asyncio.get_running_loop().create_task(self._send_abort(worker_id, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_abort(self, worker_id: str, request_id: str) -> None:
        state = self.registry.get(worker_id)
        if state is None:  # removed meanwhile (admin API): its channel is closed
            return
        try:
            await state.client.abort(request_id)
        except grpc.aio.AioRpcError as exc:
            log.info("abort %s on %s failed: %s", request_id, worker_id, exc.code().name)

    def finish_timing(self, plan: Plan) -> None:
        """Called when the request's last output is handed to the client, or it is dropped:
        releases its admission slot; idempotent."""
        if not self.admission.release(plan.slot):
            return
        self.metrics.overhead_s.observe(plan.timing.overhead_s)
        self.metrics.overhead_cpu_s.observe(plan.timing.overhead_cpu_s)
        self.metrics.e2e_s.observe(time.perf_counter() - plan.timing.arrival_s)

    async def close(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(task, timeout=1.0)


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """Text parts are joined with newlines (vLLM's "string" content format)."""
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = "\n".join(part["text"] for part in content)
    return message


def _rpc_error(exc: grpc.aio.AioRpcError, worker_id: str) -> RouterError:
    code = exc.code()
    message = f"worker {worker_id}: {code.name}: {exc.details()}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(message)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return ServiceUnavailable(message)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(message)
    return WorkerFailed(message)
