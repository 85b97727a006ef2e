"""fill/follow.py without a server: what a follower may send, and how its follow ends.

Real flights over real files (the fill's writer is the test, appending to the
file and telling the flight, as the coordinator's pump does), and a real
``directory:`` origin for the rest from the origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagecache.errors import CacheStoreError, VerificationError, WriterGone
from imagecache.fill.events import NO_EVENTS
from imagecache.fill.flight import Flight, FlightKind
from imagecache.fill.follow import End, Ended, Span, follow, rest_of_body, rest_of_range
from imagecache.fill.writer import Verifier
from imagecache.records import ImageInfo
from imagecache.upstreams.base import ANONYMOUS
from imagecache.upstreams.directory import DirectoryUpstream
from polling import eventually

DATA = bytes(range(256)) * 64  # 16 KiB


def run(func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    return asyncio.get_running_loop().run_in_executor(None, func, *args)


@pytest.fixture
def flight(tmp_path: Path) -> Iterator[Flight]:
    """A decided LOCAL flight of ``DATA`` over an empty file the test appends to."""
    path = tmp_path / "incomplete"
    path.write_bytes(b"")
    made = Flight("img", ImageInfo("img", size=len(DATA), checksum=hashlib.md5(DATA).hexdigest()))
    made.fd = os.open(path, os.O_RDONLY)
    made.settle(FlightKind.LOCAL, "")
    made.decided.set()
    made.path = path  # type: ignore[attr-defined]
    yield made
    if made.fd is not None:
        os.close(made.fd)


def land(flight: Flight, upto: int) -> None:
    """The writer's part: bytes ``[0, upto)`` of DATA are in the file, and the flight knows."""
    path: Path = flight.path  # type: ignore[attr-defined]
    with path.open("ab") as out:
        out.write(DATA[path.stat().st_size : upto])
    flight.advance(upto)


class Collected:
    """A follower's items as they come, read in a task of its own, as a reader of the flight."""

    def __init__(self, flight: Flight, items: AsyncIterator[Any]) -> None:
        self.items: list[Any] = []
        self.flight = flight
        flight.readers += 1  # at once, as a request does before its first await
        self.task = asyncio.create_task(self._read(items))

    async def _read(self, items: AsyncIterator[Any]) -> None:
        self.flight.readers -= 1
        async with self.flight.reading():
            async for item in items:
                self.items.append(item)

    def sent(self) -> bytes:
        out = b""
        for item in self.items:
            if isinstance(item, Span):
                out += os.pread(item.fd, item.count, item.offset)
            elif isinstance(item, bytes):
                out += item
        return out

    @property
    def ended(self) -> Ended:
        assert isinstance(self.items[-1], Ended)
        return self.items[-1]


async def test_a_follow_sends_what_lands_holds_the_last_byte_until_verified(
    flight: Flight,
) -> None:
    follower = Collected(flight, follow(flight, run))
    land(flight, 4096)
    await eventually(lambda: follower.sent() == DATA[:4096], "the follower has sent 4096 bytes")
    land(flight, len(DATA))
    await eventually(
        lambda: follower.sent() == DATA[:-1], "the follower has sent all but the last byte"
    )
    assert not follower.task.done(), "the byte that completes the body waits for the verdict"
    flight.verified()
    await asyncio.wait_for(follower.task, 10)
    assert follower.sent() == DATA
    assert all(isinstance(item, Span) for item in follower.items[:-1])
    assert follower.ended == Ended(End.COMPLETE, len(DATA), len(DATA))


async def test_a_follow_of_a_range_ends_at_its_end(flight: Flight) -> None:
    follower = Collected(flight, follow(flight, run, 100, 200))
    land(flight, 300)
    await asyncio.wait_for(follower.task, 10)
    assert follower.sent() == DATA[100:200]
    assert follower.ended == Ended(End.COMPLETE, 200, 100)


@pytest.mark.parametrize(
    ("kind", "error", "end"),
    [
        (FlightKind.REMOTE, WriterGone("the fill was not committed"), End.WRITER_GONE),
        (FlightKind.LOCAL, CacheStoreError("the cache copy was dropped"), End.CACHE_FAILED),
        # Another process's disk is not ours: its failure leaves nothing to trust.
        (FlightKind.REMOTE, CacheStoreError("the cache file shrank"), End.FAILED),
        (FlightKind.LOCAL, VerificationError("img", "md5", "a", "b"), End.FAILED),
    ],
)
async def test_a_fill_that_fails_ends_the_follow_with_a_value_saying_how(
    flight: Flight, kind: FlightKind, error: Exception, end: End
) -> None:
    flight.settle(kind, "")
    follower = Collected(flight, follow(flight, run))
    land(flight, 5000)
    await eventually(lambda: len(follower.sent()) == 5000, "the follower has sent 5000 bytes")
    flight.fail(error)
    await asyncio.wait_for(follower.task, 10)
    assert follower.ended == Ended(end, 5000, 5000, error)
    assert follower.ended.end.resumable is (end in (End.WRITER_GONE, End.CACHE_FAILED))


async def test_a_fill_that_fails_before_any_byte_ends_with_nothing_sent(flight: Flight) -> None:
    follower = Collected(flight, follow(flight, run, 10))
    error = WriterGone("stalled")
    flight.fail(error)
    await asyncio.wait_for(follower.task, 10)
    assert follower.items == [Ended(End.WRITER_GONE, 10, 0, error)]


async def test_an_error_nobody_meant_propagates(flight: Flight) -> None:
    follower = Collected(flight, follow(flight, run))
    flight.fail(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(follower.task, 10)


async def test_a_follow_of_unknown_size_yields_bytes(flight: Flight) -> None:
    flight.info = ImageInfo("img")
    follower = Collected(flight, follow(flight, run))
    land(flight, len(DATA))
    await eventually(
        lambda: follower.sent() == DATA, "the follower has sent the whole image"
    )  # chunked: nothing held back but the end
    flight.finish(len(DATA))
    await asyncio.wait_for(follower.task, 10)
    assert all(isinstance(item, bytes) for item in follower.items[:-1])
    assert follower.ended == Ended(End.COMPLETE, len(DATA), len(DATA))


def _origin(tmp_path: Path, data: bytes) -> DirectoryUpstream:
    root = tmp_path / "origin"
    root.mkdir()
    (root / "img").write_bytes(data)
    return DirectoryUpstream(root)


async def test_the_rest_of_a_body_comes_from_the_origin_verified(
    flight: Flight, tmp_path: Path
) -> None:
    land(flight, 6000)
    verifier = Verifier("img", flight.info)
    upstream = _origin(tmp_path, DATA)
    rest = Collected(
        flight, rest_of_body(flight, upstream, ANONYMOUS, verifier, run, NO_EVENTS, 6000)
    )
    await asyncio.wait_for(rest.task, 10)
    assert rest.sent() == DATA[6000:]
    assert rest.ended == Ended(End.COMPLETE, len(DATA) - 6000, len(DATA) - 6000)


async def test_the_rest_of_a_body_that_fails_verification_never_completes_it(
    flight: Flight, tmp_path: Path
) -> None:
    land(flight, 6000)
    changed = DATA[:-1] + b"\0"  # the origin now has other bytes: the md5 no longer matches
    upstream = _origin(tmp_path, changed)
    verifier = Verifier("img", flight.info)
    rest = Collected(
        flight, rest_of_body(flight, upstream, ANONYMOUS, verifier, run, NO_EVENTS, 6000)
    )
    await asyncio.wait_for(rest.task, 10)
    assert rest.ended.end is End.FAILED
    assert isinstance(rest.ended.error, VerificationError)
    assert len(rest.sent()) < len(changed) - 6000, "the last piece is held back"


async def test_the_rest_of_a_range_is_checked_against_what_was_sent(
    flight: Flight, tmp_path: Path
) -> None:
    land(flight, 3000)
    upstream = _origin(tmp_path, DATA)
    rest = Collected(
        flight, rest_of_range(flight, upstream, ANONYMOUS, run, NO_EVENTS, 1000, 3000, 9000)
    )
    await asyncio.wait_for(rest.task, 10)
    assert rest.sent() == DATA[3000:9000]
    assert rest.ended.end is End.COMPLETE

    other = tmp_path / "other"
    other.mkdir()
    (other / "img").write_bytes(DATA[:2000] + b"\xff" + DATA[2001:])
    rest = Collected(
        flight,
        rest_of_range(
            flight, DirectoryUpstream(other), ANONYMOUS, run, NO_EVENTS, 1000, 3000, 9000
        ),
    )
    await asyncio.wait_for(rest.task, 10)
    assert rest.ended.end is End.FAILED
    assert "differ from the origin's" in str(rest.ended.error)
    assert rest.sent() == b"", "nothing past a mismatch"
