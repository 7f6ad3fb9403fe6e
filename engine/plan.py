"""The scheduler <-> model runner contract: StepPlan in, StepResult out. Both frozen."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledRow:
    """One request's share of a forward pass. Read-only for the runner."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens to compute now, positions [num_computed, +len)
    num_computed_tokens: int  # KV already present in block_table for positions [0, this)
    block_table: tuple[int, ...]  # KV block ids covering num_computed + len(token_ids)
    sample: bool  # this row reaches the end of the sequence: sample the next token
    sampling: SamplingParams
    num_output_tokens: int  # generated so far; the position key for seeded sampling
    # Only when the row samples and has penalties: (prompt ids, output ids) so far.
    penalty_context: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    # Token ids banned this step (EOS / stop ids while num_output_tokens < min_tokens).
    banned_token_ids: tuple[int, ...] = ()
    # Overlapped steps only: a decode row whose one input token is the token this request
    # sampled in the step launched just before this one, still on the device (its host copy
    # is not read yet). token_ids is then empty; the runner feeds the token on the device.
    token_on_device: bool = False

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids) + self.token_on_device


@dataclass(frozen=True, slots=True)
class StepPlan:
    rows: tuple[ScheduledRow, ...]  # decode rows (1 token) first, then prefill chunks
    preempted_request_ids: tuple[str, ...]  # informational: preempted to make room this step

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(r.num_new_tokens for r in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # natural log, of the model's raw (unprocessed) distribution
    top: tuple[tuple[int, float], ...]  # the top-n (token_id, logprob), best first


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the runner produced for the rows that sample (row.sample is True)."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprob]  # only rows whose sampling.logprobs is not None
