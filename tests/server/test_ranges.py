"""The Range parser: decisions pinned by examples, robustness by Hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagecache.errors import MalformedRange, RangeNotSatisfiable
from imagecache.server.ranges import ByteRange, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=9-9", 10, (9, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=4-", 10, (4, 10)),
        ("bytes=2-100", 10, (2, 10)),
        ("bytes=-100", 10, (0, 10)),
        ("BYTES = 1-2", 10, (1, 3)),
        ("bytes=1-2,", 10, (1, 3)),  # RFC 9110 §5.6.1: empty list elements are ignored
    ],
)
def test_satisfiable(header: str, size: int, expected: tuple[int, int]) -> None:
    assert parse_range(header, size) == ByteRange(*expected, size)


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=0-", 0)])
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as caught:
        parse_range(header, size)
    assert caught.value.size == size


@pytest.mark.parametrize(
    "header",
    [
        "bytes=",
        "bytes=-",
        "bytes=3-1",
        "bytes=a-b",
        "bytes=0-1,3-4",
        "0-1",
        "bytes=+1-2",
        "x" * 300,
    ],
)
def test_malformed(header: str) -> None:
    with pytest.raises(MalformedRange):
        parse_range(header, 10)


def test_absent_and_unknown_units_mean_the_whole_image() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("items=0-1", 10) is None


def test_content_range() -> None:
    assert ByteRange(7, 10, 10).content_range() == "bytes 7-9/10"


_range_like = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda a, b, extra: f"bytes={a}-{b}{extra}",
        st.one_of(st.just(""), st.integers(min_value=0, max_value=2**70).map(str)),
        st.one_of(st.just(""), st.integers(min_value=0, max_value=2**70).map(str)),
        st.sampled_from(["", ",", ",1-2", " ", "-"]),
    ),
)


@given(header=_range_like, size=st.integers(min_value=0, max_value=2**63))
def test_never_crashes_and_stays_inside_the_image(header: str, size: int) -> None:
    try:
        result = parse_range(header, size)
    except (MalformedRange, RangeNotSatisfiable):
        return
    if result is not None:
        assert 0 <= result.start < result.end <= size
        assert result.size == size
        assert result.length >= 1
