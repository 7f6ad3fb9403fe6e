"""Streaming token ids -> text deltas that never need to be taken back.

Decoding one token at a time is wrong in two ways: a UTF-8 character may be split over several
tokens (byte-level BPE bytes, or sentencepiece byte-fallback tokens like <0xE2><0x82><0xAC>),
and some decoders make a token's text depend on its neighbours (Metaspace drops the space of
the first token of a decode call). So, as vLLM does, each step decodes a short window that
starts at the tokens already emitted last time and subtracts the text of that prefix:

    output ids:  [ ... emitted ... | prefix (emitted) | pending (held back) | new ]
                                   ^ prefix_offset     ^ read_offset
    delta = decode(prefix + pending + new) minus its leading decode(prefix)

Text is held back while
- the window's text ends in U+FFFD, the mark of an incomplete UTF-8 sequence (byte-level BPE
  decodes bytes lossily, so only the tail can still change), or
- the window ends in a sentencepiece byte-fallback token ("<0xE2>"): the ByteFallback decoder
  turns a whole run of byte tokens into U+FFFD as soon as one byte in it is invalid, so no text
  of an open run is final. Hazard: such text (e.g. CJK characters missing from a Llama 2 style
  vocabulary) streams one run at a time, a run ending at the next non-byte token.
`flush()` releases whatever is still held when generation ends. Held tokens stay in the window,
so each `add` costs O(window); a model emitting long runs of invalid bytes makes that quadratic
in the run length (bounded by max_tokens).

Invariant (tested with hypothesis): for any ids, the deltas of `add` followed by `flush`
concatenate to exactly `tokenizer.decode(output_ids, skip_special_tokens)`. Streaming and
non-streaming responses therefore agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8


class DetokenizerError(RuntimeError):
    """The tokenizer's decode is not prefix-stable, so no correct delta exists."""


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas. One instance per request, one thread.

    `prompt_token_ids` are deliberately not used as decode context (vLLM primes its window with
    the prompt's tail). Under Metaspace decoders that context turns a leading "▁Hello" into
    " Hello" while decode(output_ids) gives "Hello", which would break the invariant above.
    The parameter stays so that callers state which prompt the output continues.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        del prompt_token_ids  # see the class docstring
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._skipped_ids = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        # Output ids from prefix_offset on; earlier ids are never decoded again.
        self._window: list[int] = []
        self._read_offset = 0  # into _window: ids before it have been emitted
        self._prefix_text = ""  # decode(_window[:_read_offset])
        self._flushed = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Append newly generated ids; return the text that became stable (possibly "")."""
        if self._flushed:
            raise RuntimeError("add() after flush(): the request's output has ended")
        self._window.extend(token_ids)
        text = self._decode(self._window)
        if (
            len(text) <= len(self._prefix_text)
            or text.endswith(_INCOMPLETE)
            or self._in_byte_fallback_run()
        ):
            return ""
        delta = self._delta(text)
        # The emitted tokens become the next prefix. They contain at least one token with text
        # (the window's text grew), so a decoder that treats the first token of a call
        # specially (Metaspace) only ever affects text that is subtracted again.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta

    def flush(self) -> str:
        """The held-back text (e.g. a trailing incomplete character, as U+FFFD). Call once."""
        if self._flushed:
            raise RuntimeError("flush() called twice")
        self._flushed = True
        text = self._decode(self._window)
        return self._delta(text) if len(text) > len(self._prefix_text) else ""

    def _in_byte_fallback_run(self) -> bool:
        """True iff the last token the decoder sees (skipped ids excluded) is a byte token."""
        byte_ids = self._tokenizer.byte_fallback_ids
        if not byte_ids:
            return False
        for token_id in reversed(self._window):
            if token_id not in self._skipped_ids:
                return token_id in byte_ids
        return False

    def _delta(self, text: str) -> str:
        if not text.startswith(self._prefix_text):
            raise DetokenizerError(
                f"decoding more tokens changed earlier text ({self._prefix_text!r} -> {text!r}); "
                "this tokenizer's decoder cannot be streamed"
            )
        return text[len(self._prefix_text) :]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
