"""PrefillMeter: a worker's prefill throughput, measured from the router's own timings.

The router knows, per worker, when it dispatched each prompt the worker computes and when that
prompt's first token came back (registry `Ticket`s). While at least one of them is in flight the
worker is *busy* on prefill work the router gave it; the throughput is the uncached tokens of the
prefills that completed over the busy seconds that produced them:

    tokens_per_s = sum(tokens of completed prefills) / sum(busy seconds)    (both decayed)

What this measures, and so what `auto` compares (router/policy.py):
- on a prefill worker: its compute, the KV transfer and the decode worker's admission, i.e.
  what a remote prefill costs a request's TTFT per token, with per-request overheads included;
- on a decode worker (prompts it prefills itself): its chunked-prefill rate *while it also
  decodes its batch* (chunks share steps with decode tokens), which is the rate that matters.
Batching is harmless (several prompts sharing steps still complete their tokens in the busy
time). Only prefills of at least `min_tokens` uncached tokens are measured: a short one's time
is mostly per-request overhead (an RPC, a KV transfer, one decode step), which would make the
rate of a worker that served many of them look several times slower for a long prompt (seen on
the CPU box: 5.9K tok/s measured on 400-token multi-turn prompts, ~25K on 3,000-token ones).
Hazards: a prefill aborted before its first token charges its busy time to the next completion;
a short prompt queued ahead of a long one counts in the long one's time (conservative).

No clock here: every method takes `now` (seconds, one monotonic clock per registry).
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY_PREFILLS = 16  # completions of history: each new one weighs 1/16 of the decayed sums
MIN_MEASURED_TOKENS = 1024  # shorter prefills are not measured (their time is overhead)


@dataclass(slots=True)
class PrefillMeter:
    memory: int = MEMORY_PREFILLS
    min_tokens: int = MIN_MEASURED_TOKENS
    _active: int = 0  # prefills dispatched here, first token not back, not dropped
    _last_event_s: float = 0.0
    _busy_pending_s: float = 0.0  # busy seconds since the last completion
    _progress_at_s: float = 0.0  # last completion, or the start of the current busy stretch
    _tokens: float = 0.0  # decayed sum of completed prefill tokens
    _busy_s: float = 0.0  # decayed sum of the busy seconds that produced them

    def started(self, now: float, tokens: int) -> None:
        if tokens < self.min_tokens:
            return
        self._advance(now)
        if self._active == 0:
            self._progress_at_s = now
        self._active += 1

    def completed(self, now: float, tokens: int) -> None:
        """The first token of a prefill started here came back."""
        if tokens < self.min_tokens:
            return
        self._advance(now)
        keep = 1.0 - 1.0 / self.memory
        self._tokens = self._tokens * keep + tokens
        self._busy_s = self._busy_s * keep + self._busy_pending_s
        self._busy_pending_s = 0.0
        self._progress_at_s = now
        self._active -= 1

    def dropped(self, now: float, tokens: int) -> None:
        """A prefill started here ended without a first token (abort, error)."""
        if tokens < self.min_tokens:
            return
        self._advance(now)
        self._active -= 1

    def tokens_per_s(self) -> float | None:
        """Measured throughput; None until a prefill completed after measurable busy time."""
        if self._busy_s <= 0.0 or self._tokens <= 0.0:
            return None
        return self._tokens / self._busy_s

    def progress_s(self, now: float) -> float:
        """Seconds the worker has worked on its current queue of measured prefills since it
        last completed one (0 when none is in flight): the part of the queue already done."""
        return now - self._progress_at_s if self._active > 0 else 0.0

    def _advance(self, now: float) -> None:
        if self._active > 0:
            self._busy_pending_s += max(0.0, now - self._last_event_s)
        self._last_event_s = now
