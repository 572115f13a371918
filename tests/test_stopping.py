"""quill.stopping: streamed stop-string matching equals the whole-text answer and a brute-force reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quill.errors import InvalidParameter
from quill.stopping import MAX_STOP_LENGTH, MAX_STOP_STRINGS, StopStrings


def reference(text: str, stops: list[str], include_stop: bool) -> tuple[str, bool]:
    """Scan end positions left to right, and for each, start positions left to right: first hit wins."""
    for end in range(len(text) + 1):
        for start in range(end):
            if text[start:end] in stops:
                return text[: end if include_stop else start], True
    return text, False


def stream(stops: StopStrings, pieces: list[str]) -> tuple[str, bool]:
    """Feed the pieces one by one, checking at each step that nothing emitted is ever taken back."""
    matcher = stops.matcher()
    final, _ = stops.truncate("".join(pieces))
    out = ""
    for piece in pieces:
        released, hit = matcher.push(piece)
        out += released
        assert final.startswith(out)
        if hit:
            assert matcher.push("more text") == ("", True) and matcher.flush() == ""
            return out, True
        # Only text that may still become a stop string is held back.
        assert matcher.held == "" or any(s.startswith(matcher.held) and s != matcher.held for s in stops.stops)
    return out + matcher.flush(), False


ALPHABET = "ab\né"


@st.composite
def cases(draw):
    text = draw(st.text(ALPHABET, max_size=40))
    from_text = st.builds(lambda i, n: text[i : i + n], st.integers(0, 40), st.integers(1, 6)).filter(bool)
    stops = draw(st.lists(st.text(ALPHABET, min_size=1, max_size=6) | from_text, min_size=1, max_size=5))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    return text, stops, pieces, draw(st.booleans())


@settings(max_examples=300, deadline=None)
@given(cases())
def test_streamed_equals_truncate_equals_reference(case):
    text, stops, pieces, include_stop = case
    matcher_stops = StopStrings(stops, include_stop)
    expected = reference(text, stops, include_stop)
    assert matcher_stops.truncate(text) == expected
    assert stream(matcher_stops, pieces) == expected


@settings(max_examples=100, deadline=None)
@given(st.text(ALPHABET, max_size=30), st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=4))
def test_one_character_at_a_time(text, stops):
    stop_strings = StopStrings(stops)
    assert stream(stop_strings, list(text)) == reference(text, stops, False)


@pytest.mark.parametrize(
    ("text", "stops", "pieces", "expected"),
    [
        ("Hello world", ["lo w"], ["Hel", "lo wo", "rld"], ("Hel", True)),
        ("xabcd", ["bc", "abc"], ["x", "a", "b", "c", "d"], ("x", True)),  # same end: earliest start wins
        ("abcd", ["abcd", "bc"], ["abcd"], ("a", True)),  # earliest end wins
        ("aaab", ["aab"], ["a", "a", "a", "b"], ("a", True)),  # overlapping partial matches
        ("abc", ["abd"], ["ab", "c"], ("abc", False)),  # held "ab" released when it cannot match
        ("no stop here", [], ["no ", "stop here"], ("no stop here", False)),
    ],
)
def test_examples(text, stops, pieces, expected):
    assert stream(StopStrings(stops), pieces) == expected
    assert StopStrings(stops).truncate(text) == expected


def test_include_stop():
    assert StopStrings(["END"], include_stop=True).truncate("abcENDxyz") == ("abcEND", True)
    assert stream(StopStrings(["END"], include_stop=True), ["abcE", "NDx", "yz"]) == ("abcEND", True)


def test_held_text_is_released_early():
    matcher = StopStrings(["abc"]).matcher()
    assert matcher.push("xxab") == ("xx", False)
    assert matcher.push("d") == ("abd", False)


def test_accepted_forms():
    assert StopStrings(None).stops == ()
    assert StopStrings("x").stops == ("x",)
    assert StopStrings(["a"] * 3).stops == ("a",)
    StopStrings([str(i) for i in range(MAX_STOP_STRINGS)])
    StopStrings(["x" * MAX_STOP_LENGTH])


@pytest.mark.parametrize(
    "stops",
    [
        [str(i) for i in range(MAX_STOP_STRINGS + 1)],
        [""],
        ["ok", ""],
        ["x" * (MAX_STOP_LENGTH + 1)],
        [3],
        ["ok", None],
        42,
    ],
)
def test_invalid_stop(stops):
    with pytest.raises(InvalidParameter) as info:
        StopStrings(stops)
    assert info.value.param == "stop"
    assert "stop" in str(info.value)
