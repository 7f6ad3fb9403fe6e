"""Request migration: a choice whose decode worker is lost mid-stream goes on on another one.

What the client sees does not change: the router re-issues the choice to another decode worker
with the prompt and every token the lost worker delivered (`resume_output_token_ids`); that
worker recomputes their KV (a local prefill, as after a preemption) and streams only what
follows, so no token is lost or sent twice.

Exactness, and why it holds (tests/engine/test_resume.py, tests/integration/test_chaos.py):
- The delivered tokens are the worker's *output*, not more prompt (Dynamo appends them to the
  prompt and lowers max_tokens): max_tokens, min_tokens, the output penalties and the position
  a seeded draw is keyed on all continue from where they were, so greedy and seeded choices
  produce exactly the tokens of a fault-free run.
- The worker replays the delivered tokens through the request's text stream one at a time, as
  they were produced, so detokenizer offsets and a stop string that straddles the cut carry
  over; the text it held back (a pending stop-string match) is emitted by the new worker.
- usage.completion_tokens counts the whole output (the worker adds the resumed tokens).

What migrates: a stream that broke because its worker went away (gRPC UNAVAILABLE; CANCELLED,
which the router's own channel reports when a restarted worker is re-registered at a new
address; a stream that ended without a finish reason). Not a refusal (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED), a deadline, or an engine failure (a request that crashes its engine would
take the next worker with it). At most `migration_limit` times per choice; then the client gets
the last error (SSE error event or OpenAI error body). A migrated choice always prefills on its
new decode worker: the prefill pool is not involved, so a lost prefill worker cannot fail it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from router.config import Mode, PolicyConfig
from router.errors import RouterError
from router.policy import RouteDecision, RouteRequest, WorkerSnapshot, route

# gRPC codes of a stream cut by the loss of its worker (see the module docstring)
MIGRATABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# how long a migration waits for a decode worker to route to (all may be restarting), seconds
ROUTE_WAIT_S = 5.0
ROUTE_POLL_S = 0.1


class WorkerLost(Exception):
    """A choice's stream broke in a way that migration may repair."""

    def __init__(self, worker_id: str, address: str, error: RouterError) -> None:
        super().__init__(error.message)
        self.worker_id = worker_id
        self.address = address
        self.error = error  # what the client gets if the choice cannot be migrated


@dataclass(slots=True)
class Progress:
    """One choice across its attempts (mutated by the frontend only)."""

    output_token_ids: list[int] = field(default_factory=list)  # delivered, in order
    migrations: int = 0


def migratable(code: grpc.StatusCode) -> bool:
    return code in MIGRATABLE_CODES


def continuation_route(
    prompt_ids: Sequence[int],
    progress: Progress,
    overlaps: dict[str, int],
    workers: Sequence[WorkerSnapshot],
    lost: WorkerLost,
    seq: int,
    policy: PolicyConfig,
) -> RouteDecision:
    """Where the choice goes on: a decode worker that prefills prompt + output itself, chosen by
    the collocated cost. The lost worker is left out unless it came back at another address (a
    restart). Pure; raises Unroutable."""
    num_tokens = len(prompt_ids) + len(progress.output_token_ids)
    candidates = [
        w for w in workers if not (w.worker_id == lost.worker_id and w.address == lost.address)
    ]
    return route(RouteRequest(num_tokens, overlaps, seq), candidates, Mode.COLLOCATED, policy)
