"""runtime.detokenizer: streamed deltas concatenate to exactly tokenizer.decode(output ids).

Checked on two kinds of tokenizer: byte-level BPE (SmolLM2, GPT-2 style) and a sentencepiece-style
byte-fallback BPE built here (Llama 2 style: Metaspace, <0xE2><0x82><0xAC> byte tokens).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from runtime.detokenizer import IncrementalDetokenizer
from runtime.tokenizer import Tokenizer

PROMPT = [1, 2, 3]


def stream(
    tokenizer: Tokenizer, chunks: Sequence[Sequence[int]], skip_special_tokens: bool = True
) -> list[str]:
    """All deltas of one request: one per chunk, then the flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, PROMPT, skip_special_tokens)
    deltas = [detokenizer.add(chunk) for chunk in chunks]
    deltas.append(detokenizer.flush())
    return deltas


@st.composite
def chunked(draw: st.DrawFn, ids: st.SearchStrategy[list[int]]) -> list[list[int]]:
    """`ids` split into consecutive chunks of 1-3 ids (engines emit 1, speculation several)."""
    flat = draw(ids)
    chunks: list[list[int]] = []
    while flat:
        size = draw(st.integers(min_value=1, max_value=3))
        chunks.append(flat[:size])
        flat = flat[size:]
    return chunks


# ------------------------------------------------------------ sentencepiece-style byte fallback

PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "é", "▁h", "▁he", "ll", "llo", "▁hello"]
PIECES += ["▁w", "or", "▁wor", "ld", "▁world"]
MERGES = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o"), ("▁he", "llo"), ("▁", "w")]
MERGES += [("o", "r"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld")]
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


# Decoder chains of sentencepiece-converted tokenizers. "llama2" is Llama 2's tokenizer.json;
# "fused_metaspace" (ByteFallback, Fuse, Metaspace) drops every inner space under tokenizers 0.23,
# but it is still a decoder whose output must be streamed exactly.
DECODERS = {
    "llama2": lambda: decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    ),
    "metaspace": lambda: decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="first"), decoders.Fuse()]
    ),
    "fused_metaspace": lambda: decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace("▁", prepend_scheme="first")]
    ),
}
READABLE_DECODERS = ["llama2", "metaspace"]


def byte_fallback_tokenizer_in(model_dir: Path, decoder: str) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIALS + BYTE_TOKENS + PIECES)}
    backend = BackendTokenizer(
        models.BPE(vocab, MERGES, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = DECODERS[decoder]()
    backend.add_special_tokens(SPECIALS)
    backend.save(str(model_dir / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module", params=list(DECODERS))
def byte_fallback_tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    return byte_fallback_tokenizer_in(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module", params=READABLE_DECODERS)
def readable_byte_fallback_tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Tokenizer:
    return byte_fallback_tokenizer_in(tmp_path_factory.mktemp(request.param), request.param)


def test_byte_fallback_ids_are_known(byte_fallback_tokenizer: Tokenizer) -> None:
    assert byte_fallback_tokenizer.byte_fallback_ids == frozenset(range(3, 3 + 256))


def test_byte_fallback_tokens_are_joined_before_emission(
    readable_byte_fallback_tokenizer: Tokenizer,
) -> None:
    tok = readable_byte_fallback_tokenizer
    ids = tok.encode("hello € world", add_special_tokens=False)
    tokens = ["▁hello", "▁", "<0xE2>", "<0x82>", "<0xAC>", "▁world"]
    assert tok.convert_ids_to_tokens(ids) == tokens
    deltas = stream(tok, [[i] for i in ids])
    # "€" is complete after <0xAC>, but one more invalid byte would turn the whole open run into
    # U+FFFD in decode(); the run is final only once a non-byte token follows.
    assert deltas == ["hello", " ", "", "", "", "€ world", ""]
    assert stream(tok, [[i] for i in ids[:5]]) == ["hello", " ", "", "", "", "€"]


def test_metaspace_leading_space_and_skipped_specials(
    readable_byte_fallback_tokenizer: Tokenizer,
) -> None:
    tok = readable_byte_fallback_tokenizer
    hello, world = tok.encode("hello world", add_special_tokens=False)
    eos = 2
    assert stream(tok, [[eos], [hello], [world]]) == ["", "hello", " world", ""]
    assert stream(tok, [[hello], [eos], [world]]) == ["hello", "", " world", ""]
    assert stream(tok, [[hello], [eos], [world]], skip_special_tokens=False) == [
        "hello",
        "</s>",
        " world",
        "",
    ]


def test_incomplete_character_at_the_end_is_flushed(
    readable_byte_fallback_tokenizer: Tokenizer,
) -> None:
    tok = readable_byte_fallback_tokenizer
    ids = tok.encode("hello €", add_special_tokens=False)[:-1]  # drop the last byte of "€"
    deltas = stream(tok, [[i] for i in ids])
    assert deltas[:-1] == ["hello", " ", "", ""]
    assert "".join(deltas) == tok.decode(ids) == "hello \ufffd\ufffd"  # one U+FFFD per byte


FALLBACK_IDS = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=len(SPECIALS) + 256 + len(PIECES) - 1),
        # UTF-8 lead and continuation bytes, so that characters are split and sometimes invalid
        st.sampled_from([len(SPECIALS) + b for b in (0x20, 0x41, 0xC3, 0xA9, 0xE2, 0x82, 0xAC)]),
        st.sampled_from([len(SPECIALS) + b for b in (0xF0, 0x9F, 0x98, 0x80, 0xFF)]),
    ),
    max_size=24,
)


@settings(max_examples=300, deadline=None)
@given(chunks=chunked(FALLBACK_IDS), skip_special_tokens=st.booleans())
def test_byte_fallback_deltas_concatenate_to_decode(
    byte_fallback_tokenizer: Tokenizer, chunks: list[list[int]], skip_special_tokens: bool
) -> None:
    tok = byte_fallback_tokenizer
    all_ids = [i for chunk in chunks for i in chunk]
    deltas = stream(tok, chunks, skip_special_tokens)
    assert "".join(deltas) == tok.decode(all_ids, skip_special_tokens=skip_special_tokens)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet="helo wrdé€😀漢\n", max_size=30))
def test_valid_text_streams_without_replacement_characters(
    readable_byte_fallback_tokenizer: Tokenizer, text: str
) -> None:
    tok = readable_byte_fallback_tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    deltas = stream(tok, [[i] for i in ids])
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == tok.decode(ids)


# ------------------------------------------------------------ byte-level BPE (SmolLM2)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


MULTIBYTE_TEXT = "東京 😀🎉 👨‍👩‍👧 café €5 한국어 🇫🇷\n\n  x"


@pytest.mark.model
def test_byte_level_text_streams_without_replacement_characters(
    smollm2_tokenizer: Tokenizer,
) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode(MULTIBYTE_TEXT)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # characters really are split
    deltas = stream(tok, [[i] for i in ids])
    assert not any("\ufffd" in delta for delta in deltas)
    assert "".join(deltas) == MULTIBYTE_TEXT


@pytest.mark.model
@settings(max_examples=200, deadline=None)
@given(data=st.data(), skip_special_tokens=st.booleans())
def test_byte_level_deltas_concatenate_to_decode(
    smollm2_tokenizer: Tokenizer, data: st.DataObject, skip_special_tokens: bool
) -> None:
    tok = smollm2_tokenizer
    interesting = sorted(set(tok.encode(MULTIBYTE_TEXT)) | set(range(17)))
    ids = st.lists(
        st.one_of(
            st.integers(min_value=0, max_value=tok.vocab_size - 1), st.sampled_from(interesting)
        ),
        max_size=20,
    )
    chunks = data.draw(chunked(ids))
    all_ids = [i for chunk in chunks for i in chunk]
    deltas = stream(tok, chunks, skip_special_tokens)
    assert "".join(deltas) == tok.decode(all_ids, skip_special_tokens=skip_special_tokens)


# ------------------------------------------------------------ lifecycle


def test_add_or_flush_after_flush_is_an_error(byte_fallback_tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(byte_fallback_tokenizer, PROMPT)
    assert detokenizer.add([]) == ""
    assert detokenizer.flush() == ""
    with pytest.raises(RuntimeError, match="after flush"):
        detokenizer.add([5])
    with pytest.raises(RuntimeError, match="twice"):
        detokenizer.flush()
