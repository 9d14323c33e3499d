"""Incremental detokenization and stop strings (server/text.py), no model needed."""

from __future__ import annotations

import random

import pytest

from aurora_spec.server.text import REPLACEMENT, IncrementalDetokenizer, StopMatcher
from tests.server_helpers import ByteTokenizer


def stream(tok, ids: list[int], chunks: list[int]) -> list[str]:
    detok, out, i = IncrementalDetokenizer(tok), [], 0
    for n in chunks:
        out.append(detok.push(ids[i:i + n]))
        i += n
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "数学 🌍🚀 ok", "e\u0301 ∑ 𝔸"])
def test_multibyte_characters_are_never_split(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    deltas = stream(tok, ids, [1] * len(ids))
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)


def test_random_bytes_and_chunking_match_full_decode() -> None:
    tok, rng = ByteTokenizer(), random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(3, 259) for _ in range(rng.randrange(0, 30))]
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randrange(1, 5)))
            left -= chunks[-1]
        assert "".join(stream(tok, ids, chunks)) == tok.decode(ids)


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m, shown = StopMatcher(stops), []
    for p in pieces:
        shown.append(m.feed(p))
    shown.append(m.finish())
    return "".join(shown), m.stopped, shown


def test_stop_string_across_pieces_is_cut_and_never_shown() -> None:
    text, stopped, shown = feed_all(["END"], ["hello E", "N", "D and more"])
    assert (text, stopped) == ("hello ", True)
    assert all("E" not in s for s in shown)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    text, stopped, _ = feed_all(["###"], ["a #", "# b", " c"])
    assert (text, stopped) == ("a ## b c", False)


def test_earliest_of_several_stops_wins() -> None:
    text, stopped, _ = feed_all(["zz", "b"], ["aazz", "b"])
    assert (text, stopped) == ("aa", True)
    assert feed_all(["\n"], ["line one\nline two"])[0] == "line one"


def test_no_stops_passes_text_through() -> None:
    assert feed_all([], ["a", "b"])[2] == ["a", "b", ""]
