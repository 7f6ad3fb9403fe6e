"""Stop strings over streamed text: never show a client part of a stop string.

Text arrives in arbitrary deltas. A delta may end in the first characters of a stop string
("...<|" of "<|end|>"), which must not be emitted until the next delta decides whether the stop
string completes. So the matcher holds back the longest suffix that is a proper prefix of some
stop string, and emits the rest:

    pending = held + delta
    pending:  [ emitted now ................. | held: could start a stop string ]

Which stop wins: the occurrence that *completes* first; among those completing at the same
character, the one starting first. That is what a character-by-character stream would see, so
the result does not depend on how the text was split (tested with hypothesis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StopResult:
    """The outcome of one `feed`. Read by the engine's output path."""

    text: str  # safe to emit now; once stopped, the final text (excluding the rest of the delta)
    stopped: bool  # a stop string completed; generation must end, later text is discarded
    stop_str: str | None  # the stop string that matched, iff stopped


class StopStringMatcher:
    """Per-request stop string state. One instance per request, one thread."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._stop = tuple(dict.fromkeys(stop))  # dedupe, keep caller order
        self._include = include_stop_str_in_output
        self._held = ""  # a proper prefix of some stop string; never emitted yet
        self._stopped = False

    def feed(self, delta: str) -> StopResult:
        """Consume the next text delta; raises RuntimeError after a stop was reported."""
        if self._stopped:
            raise RuntimeError("feed() after a stop string matched")
        pending = self._held + delta
        match = self._earliest_match(pending)
        if match is not None:
            start, stop_str = match
            end = start + len(stop_str) if self._include else start
            self._held = ""
            self._stopped = True
            return StopResult(text=pending[:end], stopped=True, stop_str=stop_str)
        num_held = self._num_chars_to_hold(pending)
        self._held = pending[len(pending) - num_held :]
        return StopResult(text=pending[: len(pending) - num_held], stopped=False, stop_str=None)

    def flush(self) -> str:
        """Release the held text when generation ends for another reason (eos, max_tokens)."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the occurrence that ends first, ties to the earliest start."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str in self._stop:
            start = text.find(stop_str)  # the first occurrence of one string also ends first
            if start < 0:
                continue
            candidate = (start + len(stop_str), start, stop_str)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _num_chars_to_hold(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop_str in self._stop:
            for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
                if text.endswith(stop_str[:length]):
                    longest = length
                    break
        return longest
