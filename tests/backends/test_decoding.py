from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hotweights.backends import IncrementalDecoder, StopMatcher
from hotweights.backends.decoding import HELD_TOKENS, REPLACEMENT
from tests.backends.stop_reference import first_stop_reference


def decode_bytes(ids: Sequence[int]) -> str:
    """A byte-level tokenizer's decode: every id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def push_all(decoder: IncrementalDecoder, ids: Sequence[int]) -> list[str]:
    return [decoder.push(token) for token in ids]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("é", ["", "é"]),
        ("😀", ["", "", "", "😀"]),
        ("aé", ["a", "", "é"]),
        ("€!", ["", "", "€", "!"]),
    ],
)
def test_multibyte_characters_are_emitted_whole(text: str, expected: list[str]) -> None:
    decoder = IncrementalDecoder(decode_bytes)
    assert push_all(decoder, list(text.encode())) == expected
    assert decoder.flush() == ""


def test_invalid_bytes_become_a_replacement_once_certain() -> None:
    decoder = IncrementalDecoder(decode_bytes)
    assert push_all(decoder, [0xC3, 0x41]) == ["", f"{REPLACEMENT}A"]


def test_flush_releases_an_incomplete_character() -> None:
    decoder = IncrementalDecoder(decode_bytes)
    assert push_all(decoder, [0x41, 0xF0, 0x9F]) == ["A", "", ""]
    assert decoder.flush() == REPLACEMENT
    assert decoder.flush() == ""


def test_tokens_without_text_emit_nothing() -> None:
    special = 999

    def decode(ids: Sequence[int]) -> str:
        return decode_bytes([token for token in ids if token != special])

    decoder = IncrementalDecoder(decode)
    assert push_all(decoder, [0x68, special, 0x69]) == ["h", "", "i"]


@pytest.mark.parametrize(
    ("ids", "text"),
    [
        ([0x80] * 1000, REPLACEMENT * 1000),  # continuation bytes with nothing to continue
        ([0xF0] * 50, REPLACEMENT * 50),  # lead bytes, each cut short by the next
        ([0x80] * 30 + list("😀é".encode()), REPLACEMENT * 30 + "😀é"),
        ([999] * 40 + [0x68, 999, 0x69], "hi"),  # tokens without text
    ],
)
def test_a_long_run_that_is_not_text_yet_is_released_as_it_comes(ids: list[int], text: str) -> None:
    """Each push decodes a window of bounded length, and at most `HELD_TOKENS` tokens'
    text waits: invalid bytes go out as U+FFFD instead of being held (and re-decoded) to
    the end of the stream, which made a run of them cost quadratic time."""
    windows: list[int] = []

    def plain(window: Sequence[int]) -> str:
        return decode_bytes([token for token in window if token != 999])

    def decode(window: Sequence[int]) -> str:
        windows.append(len(window))
        return plain(window)

    decoder = IncrementalDecoder(decode)
    sent = 0
    for pushed, token in enumerate(ids, start=1):
        sent += len(decoder.push(token))
        assert len(plain(ids[:pushed])) - sent <= HELD_TOKENS, pushed
    assert max(windows) < 2 * HELD_TOKENS
    rest = decoder.flush()
    assert sent + len(rest) == len(text)
    decoder = IncrementalDecoder(decode)
    assert "".join([*push_all(decoder, ids), decoder.flush()]) == text


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\ufffd")))
def test_any_text_round_trips_without_replacement_characters(text: str) -> None:
    decoder = IncrementalDecoder(decode_bytes)
    pieces = [*push_all(decoder, list(text.encode())), decoder.flush()]
    assert "".join(pieces) == text
    assert not any(REPLACEMENT in piece for piece in pieces)


@pytest.mark.llm
def test_real_byte_level_tokenizer_streams_whole_characters() -> None:
    from hotweights.demo.tinylm import IM_END, build_tokenizer

    tokenizer = build_tokenizer()
    text = "aé😀b"
    ids = [
        *tokenizer.encode(text, add_special_tokens=False),
        tokenizer.convert_tokens_to_ids(IM_END),
    ]
    assert len(ids) == len(text.encode()) + 1  # one token per byte, then the special

    def decode(window: Sequence[int]) -> str:
        return str(tokenizer.decode(list(window), skip_special_tokens=True))

    decoder = IncrementalDecoder(decode)
    pieces = push_all(decoder, ids)
    assert pieces == ["a", "", "é", "", "", "", "😀", "b", ""]
    assert decoder.flush() == ""


@pytest.mark.parametrize(
    ("stops", "chunks", "sent", "stopped"),
    [
        ((), ["hello", " world"], "hello world", False),
        (("lo",), ["hel", "lo"], "hel", True),
        (("lo",), ["he", "l", "o world"], "he", True),
        (("xyz",), ["abcxy", "z"], "abc", True),
        (("xyz",), ["abcxy", "q"], "abcxyq", False),
        (("b", "a"), ["xab"], "x", True),
        (("world", "o w"), ["hello", " world"], "hell", True),
        (("c", "aca"), ["aca"], "a", True),  # "c" is complete before "aca" is
        (("c", "aca"), ["ac", "a"], "a", True),
        (("c", "bc"), ["abc"], "a", True),  # both end at "c": the earlier start wins
    ],
)
def test_stop_matcher_table(
    stops: tuple[str, ...], chunks: list[str], sent: str, stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    out = []
    reached = False
    for chunk in chunks:
        safe, reached = matcher.feed(chunk)
        out.append(safe)
        if reached:
            break
    if not reached:
        out.append(matcher.flush())
    assert ("".join(out), reached) == (sent, stopped)


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("abcE") == ("ab", False)  # "cE" could still become "END"
    assert matcher.feed("N") == ("c", False)
    assert matcher.feed("D tail") == ("", True)
    assert matcher.feed("more") == ("", True)


@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_stop_matcher_sends_exactly_the_text_before_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    expected, hit = first_stop_reference(text, stops)
    bounds = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    matcher = StopMatcher(stops)
    sent = ""
    reached = False
    for start, end in pairwise(bounds):
        safe, reached = matcher.feed(text[start:end])
        sent += safe
        assert expected.startswith(sent)  # nothing sent is ever part of a stop string
        if reached:
            break
    if not reached:
        sent += matcher.flush()
    assert sent == expected
    assert reached == hit
