"""Request: per-request state owned by the scheduler (mutable; one owner)."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams
from runtime.block_hash import hash_block_tokens


class RequestStatus(enum.Enum):
    WAITING = enum.auto()  # queued for (re)computation; holds no blocks
    WAITING_FOR_KV = enum.auto()  # decode role: blocks reserved, KV written from elsewhere
    RUNNING = enum.auto()  # holds blocks, scheduled every step
    FINISHED = enum.auto()


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"


@dataclass(slots=True)
class Request:
    """State of one sequence. Mutated only by the scheduler (and the engine's output step).

    Token regions of `token_ids` (prompt followed by generated tokens):

        |<------ num_computed_tokens ------>|<-- scheduled this step -->|
        |<-- prompt -->|<-- output tokens -------------------------------->|

    `block_table` covers at least num_computed_tokens; its first `num_committed_blocks` blocks
    are in the prefix cache under `block_hashes[:num_committed_blocks]`.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    max_tokens: int  # resolved: min(params.max_tokens, max_model_len - prompt length)
    stop_token_ids: frozenset[int]  # EOS ids (unless ignore_eos) + params.stop_token_ids
    arrival_s: float  # time.monotonic() when the engine took it
    hold_kv_on_finish: bool = False  # prefill role: blocks stay pinned until released
    token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # advanced when a step is scheduled (its KV will be there)
    # Overlapped steps: tokens sampled by launched steps whose results are not read yet (0 or
    # 1); they follow token_ids, and a step scheduled meanwhile counts them as there.
    num_pending_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    block_hashes: list[int] = field(default_factory=list)  # of full blocks of token_ids
    num_committed_blocks: int = 0
    num_preemptions: int = 0
    # time.monotonic() of the first step that scheduled it (queue time = this - arrival_s);
    # set at admission for a remote-prefilled request, which never queues here
    scheduled_s: float | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def update_block_hashes(self, block_size: int) -> None:
        """Extend block_hashes to cover every full block of token_ids (chained)."""
        self.hash_blocks(block_size, len(self.token_ids) // block_size)

    def lazy_block_hashes(self, block_size: int, num_blocks: int) -> Iterator[int]:
        """block_hashes[0..num_blocks) (all full blocks: the caller's bound), each hashed (and
        kept) only when the consumer reaches it: a prefix match that stops at its first miss
        hashes that far and no further."""
        for i in range(num_blocks):
            self.hash_blocks(block_size, i + 1)
            yield self.block_hashes[i]

    def hash_blocks(self, block_size: int, num_blocks: int) -> None:
        """Extend block_hashes to the first `num_blocks` blocks (all full: the caller's bound)."""
        while len(self.block_hashes) < num_blocks:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            chunk = self.token_ids[i * block_size : (i + 1) * block_size]
            self.block_hashes.append(hash_block_tokens(parent, chunk))
