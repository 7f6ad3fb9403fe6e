"""PrefillMeter: a worker's prefill throughput, measured from the router's own timings.

The router knows, per worker, when it dispatched each prompt the worker computes and when that
prompt's first token came back (registry `Ticket`s). While at least one of them is in flight the
worker is *busy* on prefill work the router gave it; the throughput is the uncached tokens of the
prefills that completed over the busy seconds that produced them:

    tokens_per_s = sum(tokens of completed prefills) / sum(busy seconds)    (both decayed)

What this measures, and so what `auto` compares (router/policy.py):
- on a prefill worker: its compute and the first token's way back through the decode worker
  (the KV transfer follows it, off the TTFT), i.e. what a remote prefill costs a request's
  TTFT per token, with per-request overheads included;
- on a decode worker (prompts it prefills itself): its chunked-prefill rate *while it also
  decodes its batch* (chunks share steps with decode tokens), which is the rate that matters.
Batching is harmless (several prompts sharing steps still complete their tokens in the busy
time).

The time model has two terms, fitted over the completions (decayed least squares of each
completion's busy seconds on its uncached tokens):

    seconds(prompts, tokens) = per_prompt_s * prompts + tokens / tokens_per_s

because a prefill's time is not proportional to its tokens: an RPC, a KV transfer and a decode
step per prompt come on top. A rate alone, measured on one mix of prompt lengths, misjudges
another: on the CPU box 5.9K tok/s measured on 400-token multi-turn prompts made every 3,000-token
prompt look over budget (~25K tok/s on those); on two H200s, multi-turn, a rate measured on the
rare long prompts only (each one's time including the short prompts queued ahead of it) read 3.0K
tok/s where the worker did 24.5K, and auto spilled 179 prompts onto the busy decode GPU. With no
spread of lengths to fit (a workload of one prompt length), or a fit that is not physical (a
negative term), the model is the plain rate: per_prompt_s = 0.
Hazard: a prefill aborted before its first token charges its busy time to the next completion.

A model is only as good as the prompts it was fitted on: `covers(tokens)` is False for a
worker with fewer than MIN_PREFILLS completions behind its model, or for a prompt over
EXTRAPOLATION times their mean length. On two H200s, after a multi-turn sweep, a decode worker's
rate fitted on 2 local prefills of ~128 tokens read 5.2K tok/s (its step time per prompt, not a
throughput) and auto sent 8,000-token prompts to a saturated prefill worker as "local not
sooner" (31K tok/s once measured on them). The policy then assumes the prefill worker's model
(router/policy.py).

No clock here: every method takes `now` (seconds, one monotonic clock per registry).
"""

from __future__ import annotations

from dataclasses import dataclass

MEMORY_PREFILLS = 32  # completions of history: each new one weighs 1/32 of the decayed sums
# Below this relative spread of prompt lengths (variance / mean^2) the two terms cannot be told
# apart and the plain rate is used. 0.01 = a standard deviation of 10 % of the mean length.
MIN_RELATIVE_VARIANCE = 0.01
# A model covers prompts up to EXTRAPOLATION x the mean length it was fitted on, once it has
# MIN_PREFILLS (decayed) completions behind it.
MIN_PREFILLS = 4.0
EXTRAPOLATION = 4.0


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """A worker's measured prefill time model: seconds = per_prompt_s * prompts + tokens /
    tokens_per_s."""

    tokens_per_s: float  # > 0
    per_prompt_s: float  # >= 0: RPCs, the first token's hops, the first step, per prompt
    prompts: float  # completions it was fitted on (decayed: recent ones weigh more)
    mean_tokens: float  # their mean uncached tokens

    def seconds(self, prompts: int, tokens: int) -> float:
        return self.per_prompt_s * prompts + tokens / self.tokens_per_s

    def covers(self, tokens: int) -> bool:
        """Fitted on enough prompts, of lengths that a prompt of `tokens` does not leave far
        behind (the time of short prompts is mostly per-prompt cost: extrapolated to a long
        one, it reads as a slow rate)."""
        return self.prompts >= MIN_PREFILLS and tokens <= EXTRAPOLATION * self.mean_tokens

    def __str__(self) -> str:
        rate = f"{self.tokens_per_s:.0f} tok/s"
        return (
            rate
            if self.per_prompt_s == 0.0
            else f"{rate} + {self.per_prompt_s * 1e3:.1f} ms/prompt"
        )


@dataclass(slots=True)
class PrefillMeter:
    memory: int = MEMORY_PREFILLS
    _active: int = 0  # prefills dispatched here, first token not back, not dropped
    _last_event_s: float = 0.0
    _busy_pending_s: float = 0.0  # busy seconds since the last completion
    _progress_at_s: float = 0.0  # last completion, or the start of the current busy stretch
    # decayed sums over completions i of 1, t_i, t_i^2, b_i, t_i * b_i (t: tokens, b: busy s)
    _n: float = 0.0
    _t: float = 0.0
    _tt: float = 0.0
    _b: float = 0.0
    _tb: float = 0.0

    def started(self, now: float) -> None:
        self._advance(now)
        if self._active == 0:
            self._progress_at_s = now
        self._active += 1

    def completed(self, now: float, tokens: int) -> None:
        """The first token of a prefill started here came back."""
        self._advance(now)
        keep = 1.0 - 1.0 / self.memory
        b = self._busy_pending_s
        self._n = self._n * keep + 1.0
        self._t = self._t * keep + tokens
        self._tt = self._tt * keep + float(tokens) * tokens
        self._b = self._b * keep + b
        self._tb = self._tb * keep + tokens * b
        self._busy_pending_s = 0.0
        self._progress_at_s = now
        self._active -= 1

    def dropped(self, now: float) -> None:
        """A prefill started here ended without a first token (abort, error)."""
        self._advance(now)
        self._active -= 1

    def cost(self) -> PrefillCost | None:
        """The fitted model; None until a prefill completed after measurable busy time."""
        if self._b <= 0.0 or self._t <= 0.0:
            return None
        mean_t = self._t / self._n
        plain = PrefillCost(self._t / self._b, 0.0, self._n, mean_t)
        var_t = self._tt / self._n - mean_t * mean_t
        if var_t < MIN_RELATIVE_VARIANCE * mean_t * mean_t:
            return plain
        cov = self._tb / self._n - mean_t * (self._b / self._n)
        per_token_s = cov / var_t
        per_prompt_s = self._b / self._n - per_token_s * mean_t
        if per_token_s <= 0.0 or per_prompt_s < 0.0:
            return plain
        return PrefillCost(1.0 / per_token_s, per_prompt_s, self._n, mean_t)

    def progress_s(self, now: float) -> float:
        """Seconds the worker has worked on its current queue of prefills since it last
        completed one (0 when none is in flight): the part of the queue already done."""
        return now - self._progress_at_s if self._active > 0 else 0.0

    def _advance(self, now: float) -> None:
        if self._active > 0:
            self._busy_pending_s += max(0.0, now - self._last_event_s)
        self._last_event_s = now
