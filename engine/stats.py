"""StepStats: what one engine step did, for exporters. Plain numbers; no metrics library here.

`Engine.step()` fills one per non-empty step (`Engine.last_step_stats`); a worker's exporter
(`runtime/worker_metrics.py`) turns it into Prometheus counters and histograms. Nothing is
averaged or rated here: rates come from PromQL over the counters.

Row kinds, per ScheduledRow of the step's plan:

    decode row   1 token, at an output position (the KV of the last sampled token)
    prefill row  everything else: a prompt chunk, or a recompute after preemption

A request with prompt P, C prompt tokens served from the prefix cache and O output tokens
(no preemption) costs one engine P - C prefill tokens and O - 1 decode tokens; in disagg the
prefill worker spends the P - C (and samples the first token) and the decode worker the O - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.plan import StepPlan
from engine.request import Request


@dataclass(frozen=True, slots=True)
class StepStats:
    """One non-empty engine step. Times are time.monotonic() seconds."""

    started_s: float  # when schedule() began
    duration_s: float  # schedule + forward + sample + bookkeeping + detokenize
    num_rows: int  # batch size: requests in the forward pass
    num_prefill_rows: int
    num_decode_rows: int
    num_prefill_tokens: int  # tokens computed in prefill rows (incl. recompute)
    num_decode_tokens: int  # tokens computed in decode rows (one per row)
    num_preempted: int  # requests preempted to make room this step
    # Requests scheduled for the first time this step (not remote-prefilled ones, which
    # arrive with their KV): their prefix-cache lookups and queue times.
    num_prefix_query_tokens: int  # prompt tokens looked up in the prefix cache
    num_prefix_hit_tokens: int  # of those, served from it
    queue_times_s: tuple[float, ...]  # arrival -> first scheduled, one per such request


def is_decode_row(num_new_tokens: int, num_output_tokens: int) -> bool:
    """A row that computes the KV of one already sampled output token."""
    return num_new_tokens == 1 and num_output_tokens >= 1


def step_stats(
    plan: StepPlan, row_requests: Sequence[Request], started_s: float, now_s: float
) -> StepStats:
    """Stats of the step that ran `plan`; row_requests[i] is the request of plan.rows[i].

    Marks each request seen here for the first time as scheduled (`Request.scheduled_s`), so
    its queue time and prefix-cache lookup are counted exactly once, however often it is
    preempted and rescheduled later.
    """
    num_decode_rows = num_decode_tokens = num_prefill_tokens = 0
    query_tokens = hit_tokens = 0
    queue_times: list[float] = []
    for row, req in zip(plan.rows, row_requests, strict=True):
        if is_decode_row(row.num_new_tokens, row.num_output_tokens):
            num_decode_rows += 1
            num_decode_tokens += 1
        else:
            num_prefill_tokens += row.num_new_tokens
        if req.scheduled_s is None:
            req.scheduled_s = started_s
            queue_times.append(started_s - req.arrival_s)
            query_tokens += req.num_prompt_tokens
            hit_tokens += req.num_cached_tokens
    return StepStats(
        started_s=started_s,
        duration_s=now_s - started_s,
        num_rows=len(plan.rows),
        num_prefill_rows=len(plan.rows) - num_decode_rows,
        num_decode_rows=num_decode_rows,
        num_prefill_tokens=num_prefill_tokens,
        num_decode_tokens=num_decode_tokens,
        num_preempted=len(plan.preempted_request_ids),
        num_prefix_query_tokens=query_tokens,
        num_prefix_hit_tokens=hit_tokens,
        queue_times_s=tuple(queue_times),
    )
