"""TextStream: one request's tokens -> text deltas, with stop strings cut (engine side)."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.detokenizer import IncrementalDetokenizer
from runtime.stop_strings import StopStringMatcher
from runtime.tokenizer import Tokenizer


class TextStream:
    """Detokenizes incrementally and holds back text that may be the start of a stop string."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        include_stop_str_in_output: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, skip_special_tokens=skip_special_tokens
        )
        self.matcher = StopStringMatcher(stop, include_stop_str_in_output) if stop else None

    def add(self, token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Returns (text safe to emit, the stop string that matched or None)."""
        delta = self.detokenizer.add(token_ids)
        if self.matcher is None:
            return delta, None
        result = self.matcher.feed(delta)
        return result.text, result.stop_str if result.stopped else None

    def finish(self) -> str:
        """Text still held back when the request ended for a reason other than a stop string."""
        tail = self.detokenizer.flush()
        if self.matcher is None:
            return tail
        result = self.matcher.feed(tail)
        return result.text + ("" if result.stopped else self.matcher.flush())
