"""Logprobs in OpenAI's two formats, with each token's string and bytes.

A token's bytes are exact: byte-level BPE vocabularies (GPT-2 style, SmolLM2, Llama 3, Qwen)
map each vocabulary character back to one byte; sentencepiece byte-fallback tokens (`<0xE2>`)
are one byte; other pieces are their UTF-8 with `▁` read as a space. The string is those bytes
decoded with U+FFFD for a partial character, so `"".join(tokens)` is the text whenever the
tokens split on character boundaries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from router.convert import TokenLogprob
from router.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from runtime.tokenizer import Tokenizer


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes -> printable unicode table."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decoder_types(tokenizer: Tokenizer) -> set[str]:
    decoder = tokenizer.backend.decoder
    if decoder is None:
        return set()
    types: set[str] = set()
    pending = [json.loads(decoder.__getstate__())]
    while pending:
        step = pending.pop()
        types.add(str(step.get("type")))
        pending.extend(step.get("decoders") or [])
    return types


class TokenStrings:
    """token id -> (string, bytes), computed once per id. Not thread-safe; one event loop."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._byte_level = _byte_level_decoder() if "ByteLevel" in _decoder_types(tokenizer) else {}
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return hit

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._tokenizer.all_special_ids:
            return self._tokenizer.id_to_token(token_id).encode()
        if token_id in self._tokenizer.byte_fallback_ids:
            return bytes([int(self._tokenizer.id_to_token(token_id)[3:5], 16)])
        piece = self._tokenizer.id_to_token(token_id)
        if self._byte_level and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        return piece.replace("▁", " ").encode()


def completion_logprobs(
    strings: TokenStrings, logprobs: Sequence[TokenLogprob], text_offset: int
) -> CompletionLogprobs:
    """The legacy format; text_offset is the choice's text length before these tokens."""
    out = CompletionLogprobs()
    for lp in logprobs:
        token, _ = strings.get(lp.token_id)
        top = {strings.get(t)[0]: v for t, v in lp.top}
        top.setdefault(token, lp.logprob)  # the sampled token is always listed, as in vLLM
        out.text_offset.append(text_offset)
        out.tokens.append(token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append(top)
        text_offset += len(token)
    return out


def chat_logprobs(
    strings: TokenStrings, logprobs: Sequence[TokenLogprob]
) -> list[ChatTokenLogprob]:
    content: list[ChatTokenLogprob] = []
    for lp in logprobs:
        token, raw = strings.get(lp.token_id)
        top = []
        for top_id, top_lp in lp.top:
            top_token, top_raw = strings.get(top_id)
            top.append(TopLogprob(token=top_token, logprob=top_lp, bytes=list(top_raw)))
        content.append(
            ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(raw), top_logprobs=top)
        )
    return content
