"""A segmented fill's scratch file (fill/scratch.py): ranges read ahead from it, holes punched.

Issue 15, items 3 and 4. The origin is the ``http_origin`` peer (a real
aiohttp server on loopback) that holds bodies at a gate, paces them and
counts every body byte it wrote; the service is the real app, its scratch
file a real unnamed file on the test's filesystem, measured by ``fstat``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imagecache.fill import scratch as scratch_module
from imagecache.fill.flight import Flight
from imagecache.fill.scratch import Scratch, Segment, punch_hole
from imagecache.server.state import STATE
from imagecache.settings import MiB
from polling import eventually
from range_helpers import COLLAPSED, STORED
from server_helpers import image_bytes, settled
from test_fill_segments import _gets

# Eight segments of 1 MiB (the last 5 bytes short).
SIZE = 8 * MiB - 5
DATA = image_bytes(SIZE, seed=15)
PATH = "/v2/images/img/file"


def _scratch_fds(incomplete: Path, image_id: str) -> list[int]:
    """This process's descriptors of files in ``incomplete`` other than the fill's own."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if target.startswith(f"{incomplete}/") and target != f"{incomplete}/{image_id}":
                found.append(int(name))
    return found


async def _read(client: TestClient[Any, Any], headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with client.get(PATH, headers=headers) as response:
        return response.status, response.headers["Cache-Status"], await response.read()


async def _held_fill(
    make_client: Any, http_origin: Any
) -> tuple[TestClient[Any, Any], asyncio.Event, Flight, asyncio.Task[tuple[int, str, bytes]]]:
    """A whole download's segmented fill over 2 connections, both held after 256 KiB.

    Returns the client, the origin's gate, the flight and the download's task.
    """
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=256 * 1024)
    client = await make_client(fill_segments=2, fill_segment_size=MiB)
    whole = asyncio.create_task(_read(client, {}))
    await http_origin.wait_for_reads("img", 2)  # segments 0 and 1, both held at the gate
    flight = client.app[STATE].fills.current("img")
    assert flight is not None
    return client, gate, flight, whole


async def test_a_range_ahead_of_a_segmented_fill_is_served_from_it_its_segment_fetched_next(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Before: it waited on the fill's rate, found it stalled, and read the origin a second time."""
    client, gate, flight, whole = await _held_fill(make_client, http_origin)
    # In segment 6, on into segment 7: both ahead of every connection.
    start, end = 6 * MiB + 1000, 7 * MiB + 500
    part = asyncio.create_task(_read(client, {"Range": f"bytes={start}-{end - 1}"}))

    def settled_range() -> bool:
        # Waiting on the scratch file's segment, or (the old way) gone to the origin.
        scratch = getattr(flight, "scratch", None)
        return bool(scratch is not None and scratch.waiting) or http_origin.body_reads("img") > 2

    await eventually(settled_range, "the range request has settled")
    gate.set()
    assert await asyncio.wait_for(part, 30) == (206, COLLAPSED, DATA[start:end])
    assert await asyncio.wait_for(whole, 30) == (200, STORED, DATA)
    await settled(client)
    gets = _gets(http_origin)
    # One image from the origin: each segment once, none of the range read again.
    assert http_origin.bytes_sent("img") == SIZE
    assert len(gets) == 8
    # Segment 6 was the next one taken (by whichever connection was free first),
    # before 2 to 5; taken in order it would have been the seventh request.
    assert gets.index(f"bytes={6 * MiB}-{7 * MiB - 1}") in (2, 3), gets
    assert (cache_dir / "img").read_bytes() == DATA


async def test_a_range_to_the_end_of_a_segmented_fill_gets_its_last_byte_once_verified(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """The last segment comes first, from the scratch file; the image's last byte waits."""
    client, gate, flight, whole = await _held_fill(make_client, http_origin)
    start = SIZE - 300  # in the last segment, to the image's end
    got: list[bytes] = []

    async def read_to_the_end() -> None:
        async with client.get(PATH, headers={"Range": f"bytes={start}-"}) as response:
            assert response.status == 206
            while len(b"".join(got)) < SIZE - 1 - start:
                got.append(await response.content.readany())
            got.append(await response.read())

    part = asyncio.create_task(read_to_the_end())
    await eventually(
        lambda: flight.scratch is not None and flight.scratch.waiting > 0,
        "the range waits on the scratch file",
    )
    # Segment 1 may finish (its connection then takes the last segment, asked
    # for); segment 0 stays held, so the fill cannot be verified.
    first_only = http_origin.gate("img", after=256 * 1024, below=MiB)
    gate.set()
    await eventually(
        lambda: len(b"".join(got)) == SIZE - 1 - start, "all but the last byte arrived"
    )
    assert b"".join(got) == DATA[start:-1]
    assert flight.available < MiB
    assert not flight.is_verified
    assert not part.done()  # the image's last byte waits for the verification
    first_only.set()
    await asyncio.wait_for(part, 30)
    assert b"".join(got) == DATA[start:]
    assert await asyncio.wait_for(whole, 30) == (200, STORED, DATA)
    await settled(client)
    assert http_origin.bytes_sent("img") == SIZE
    assert (cache_dir / "img").read_bytes() == DATA


async def test_the_scratch_file_stays_a_few_segments_on_disk_however_large_the_image(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """32 segments over 2 connections: copied spans are punched out behind the writer.

    Before: the scratch file kept every later segment until the fill ended,
    7.75 MiB of an 8 MiB image by its end.
    """
    segment = 256 * 1024
    http_origin.add("img", DATA).rate = 8 * MiB  # each connection: about 30 ms a segment
    client = await make_client(fill_segments=2, fill_segment_size=segment)
    incomplete = cache_dir / "incomplete"
    peak = late = 0
    async with client.get(PATH) as response:
        flight = client.app[STATE].fills.current("img")
        assert flight is not None
        body = asyncio.create_task(response.read())
        await eventually(
            lambda: bool(_scratch_fds(incomplete, "img")), "the fill opened its scratch file"
        )
        (fd,) = _scratch_fds(incomplete, "img")
        # Sampled on the loop that runs the fill, until its file is closed.
        while not body.done() and not flight.is_verified:
            with contextlib.suppress(OSError):
                used = os.fstat(fd).st_blocks * 512
                peak = max(peak, used)
                if flight.available >= SIZE * 3 // 4:
                    late += 1
            await asyncio.sleep(0.005)
        assert await body == DATA
    await settled(client)
    print(f"scratch file peak: {peak / MiB:.2f} MiB for a {SIZE / MiB:.0f} MiB image")
    assert late > 0, "sampled past three quarters of the image"
    # The window (2 segments per connection ahead of the writer), the one being
    # copied and a punch's 64 KiB rounding: 1.5 MiB at most, not 7.75.
    assert 0 < peak <= 6 * segment, peak
    assert http_origin.bytes_sent("img") == SIZE
    assert (cache_dir / "img").read_bytes() == DATA


def test_punch_hole_frees_blocks_and_keeps_the_size(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.pwrite(fd, b"x" * (4 * MiB), 0)
        before = os.fstat(fd).st_blocks
        punch_hole(fd, 0, 3 * MiB)
        after = os.fstat(fd)
        assert after.st_size == 4 * MiB
        assert after.st_blocks * 512 <= before * 512 - 3 * MiB
        assert os.pread(fd, 16, 0) == bytes(16)
        assert os.pread(fd, 16, 3 * MiB) == b"x" * 16
    finally:
        os.close(fd)


async def test_a_filesystem_that_cannot_punch_is_told_once_and_the_fill_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No such filesystem can be mounted here: the punch's EOPNOTSUPP is what is faked."""
    calls = []

    def refuse(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(scratch_module, "punch_hole", refuse)
    flight = Flight("img", None)
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    scratch = Scratch(fd, flight, [Segment(MiB, 2 * MiB), Segment(2 * MiB, 3 * MiB)], 4)
    flight.advance(2 * MiB)
    scratch.punch(scratch.punchable())
    assert calls == [(MiB, MiB)]
    flight.advance(3 * MiB)
    assert scratch.punchable() is None  # not asked again
    scratch.close()


async def test_a_pinned_span_holds_the_punch_back_and_the_file_open(tmp_path: Path) -> None:
    flight = Flight("img", None)
    fd = os.open(tmp_path, os.O_TMPFILE | os.O_RDWR, 0o600)
    scratch = Scratch(fd, flight, [Segment(MiB, 2 * MiB), Segment(2 * MiB, 3 * MiB)], 4)
    with scratch.pinned(MiB + 100 * 1024):
        flight.advance(3 * MiB)
        # Up to the pin's 64 KiB boundary only.
        assert scratch.punchable() == (MiB, 64 * 1024)
    assert scratch.punchable() == (MiB + 64 * 1024, 2 * MiB - 64 * 1024)
    with scratch.pinned(2 * MiB):
        scratch.close()
        os.fstat(fd)  # still open: a range is sending from it
    with pytest.raises(OSError):
        os.fstat(fd)
