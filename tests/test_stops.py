"""`StopStrings`: the streamed text, cut before the first stop string, whatever the chunking."""

from __future__ import annotations

import random

import pytest

from ferrum_jax.errors import FerrumError
from ferrum_jax.text import StopStrings


def streamed(chunks: list[str], stops: list[str]) -> tuple[str, str | None, list[str]]:
    matcher = StopStrings(stops)
    released = [matcher.push(chunk) for chunk in chunks]
    if matcher.matched is None:
        released.append(matcher.flush())
    return "".join(released), matcher.matched, released


@pytest.mark.parametrize(
    ("text", "stops", "expected", "matched"),
    [
        ("Hello world. Bye", ["."], "Hello world", "."),
        ("Hello world", ["xyz"], "Hello world", None),
        ("a\n\nb", ["\n\n"], "a", "\n\n"),
        ("User: hi\nAssistant:", ["User:", "Assistant:"], "", "User:"),
        ("say ABC then AB", ["ABC"], "say ", "ABC"),
        ("ends with AB", ["ABC"], "ends with AB", None),  # a held-back partial is released
        ("earliest wins: bb aa", ["aa", "bb"], "earliest wins: ", "bb"),
    ],
)
def test_text_is_cut_before_the_first_stop_string(text, stops, expected, matched):
    rng = random.Random(0)
    for _ in range(20):  # any chunking gives the same result
        cuts = sorted(rng.sample(range(1, len(text)), k=min(3, len(text) - 1)))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert streamed(chunks, stops)[:2] == (expected, matched)
    assert streamed(list(text), stops)[:2] == (expected, matched)


def test_nothing_that_may_start_a_stop_string_is_released_early():
    _, _, released = streamed(["Hello A", "B", "C!"], ["ABC"])
    assert released == ["Hello ", "", ""]


def test_empty_stop_string_is_refused():
    with pytest.raises(FerrumError, match="must not be empty"):
        StopStrings(["ok", ""])
