"""runtime.stop_strings: the result never depends on how the text was split into deltas."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.stop_strings import StopResult, StopStringMatcher


def run(stop: Sequence[str], include: bool, deltas: Sequence[str]) -> tuple[str, str | None]:
    """(everything a client would see, the matched stop string) for one stream of deltas."""
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
    emitted = []
    for delta in deltas:
        result = matcher.feed(delta)
        emitted.append(result.text)
        if result.stopped:
            return "".join(emitted), result.stop_str
    emitted.append(matcher.flush())
    return "".join(emitted), None


def reference(stop: Sequence[str], include: bool, text: str) -> tuple[str, str | None]:
    """Character-by-character reference: stop at the first position where a stop string ends."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stop if text[:end].endswith(s)]
        if ending_here:
            longest = max(ending_here, key=len)  # same end: the earliest start wins
            cut = end if include else end - len(longest)
            return text[:cut], longest
    return text, None


def test_stop_string_split_over_deltas_is_never_shown() -> None:
    matcher = StopStringMatcher(["<|end|>"], include_stop_str_in_output=False)
    assert matcher.feed("Hello <") == StopResult("Hello ", stopped=False, stop_str=None)
    assert matcher.feed("|en") == StopResult("", stopped=False, stop_str=None)
    assert matcher.feed("d|> ignored") == StopResult("", stopped=True, stop_str="<|end|>")


def test_held_text_is_released_when_it_cannot_start_a_stop() -> None:
    matcher = StopStringMatcher(["<|end|>"], include_stop_str_in_output=False)
    assert matcher.feed("a <|e").text == "a "
    assert matcher.feed("x").text == "<|ex"
    assert matcher.feed("<").text == ""
    assert matcher.flush() == "<"
    assert matcher.flush() == ""


def test_include_stop_str_in_output() -> None:
    matcher = StopStringMatcher(["STOP"], include_stop_str_in_output=True)
    assert matcher.feed("abc ST").text == "abc "
    assert matcher.feed("OP def") == StopResult("STOP", stopped=True, stop_str="STOP")


def test_first_completed_stop_wins() -> None:
    # "bcd" completes before "abcde", although "abcde" starts first.
    assert run(["abcde", "bcd"], False, ["abcde"]) == ("a", "bcd")
    # Same end: the one starting first (the longer) wins.
    assert run(["cd", "bcd"], True, ["xabcd"]) == ("xabcd", "bcd")
    assert run(["cd", "bcd"], False, ["xabcd"]) == ("xa", "bcd")


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher([], include_stop_str_in_output=False)
    assert matcher.feed("anything") == StopResult("anything", stopped=False, stop_str=None)
    assert matcher.flush() == ""


def test_misuse_is_an_error() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""], include_stop_str_in_output=False)
    matcher = StopStringMatcher(["x"], include_stop_str_in_output=False)
    assert matcher.feed("x").stopped
    with pytest.raises(RuntimeError, match="after a stop"):
        matcher.feed("more")


ALPHABET = "ab<|>"
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4)


@st.composite
def split_text(draw: st.DrawFn) -> list[str]:
    """A text and an arbitrary split of it into deltas (empty deltas included)."""
    text = draw(st.text(alphabet=ALPHABET + "c", max_size=40))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in itertools.pairwise(bounds)]


@settings(max_examples=500, deadline=None)
@given(stop=stop_lists, include=st.booleans(), deltas=split_text())
def test_any_split_gives_the_one_piece_result(
    stop: list[str], include: bool, deltas: list[str]
) -> None:
    text = "".join(deltas)
    one_piece = run(stop, include, [text])
    assert run(stop, include, deltas) == one_piece
    assert run(stop, include, list(text)) == one_piece
    assert one_piece == reference(stop, include, text)


@settings(max_examples=300, deadline=None)
@given(stop=stop_lists, deltas=split_text())
def test_no_emitted_prefix_contains_a_stop_string(stop: list[str], deltas: list[str]) -> None:
    # Without include, a client must never see any part of the stop string that matched, and no
    # complete stop string at all.
    shown, matched = run(stop, False, deltas)
    assert not any(s in shown for s in stop)
    if matched is not None:
        assert "".join(deltas).startswith(shown + matched)
