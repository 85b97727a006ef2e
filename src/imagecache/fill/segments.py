"""Segmented fills: one image read over several origin connections at once.

Where an origin limits each connection (an S3 or Swift proxy, nginx's
``limit_rate``), a fill over one connection runs at that connection's rate
however fast the link is. With ``fill_segments`` = N > 1 and an image whose
size the origin promised, at least twice ``fill_segment_size``, and a hash
(without one, two versions could be spliced unseen: ``plan_for``), the image
is cut into segments of ``fill_segment_size`` (starting on 64 KiB boundaries)
read over N connections at a time, each segment one ranged
``Upstream.stream`` (which resumes a broken body itself, upstreams/resume.py):

- segment 0 goes through the writer as a whole-image fill does (``copy_stream``:
  written in order, hashed by the hash thread, followers told at every chunk);
- the other segments are taken by N-1 helper tasks (N once segment 0 is in),
  in order but no more than ``WINDOW`` segments per connection past the
  writer, and a segment a range asks for before the rest (fill/scratch.py),
  one chunk held in memory per helper, and written at their offsets into a
  *scratch file*: an unnamed file (``O_TMPFILE``) beside the fill's
  ``incomplete/<id>``;
- when the writer's position reaches a segment, it takes that segment's bytes
  from the scratch file in order (a kernel copy into the fill's file, hashed
  from the page cache: ``FillWriter.copy_from``), as far as its helper has
  got, waiting for the helper when it is behind, and punches out of the
  scratch file what it has copied (fill/scratch.py).

Many segments of a bounded size, taken in order, rather than N equal parts:
the writer then trails the N segments being fetched instead of finding N-1
parts of the image to copy and hash only once the first part is in, and a
connection that runs slower than the others holds up one segment, not a
quarter of the image. On the WAN rig (bench/edge.py, a quarter-link limit per
connection) 4 equal parts left 2.5 s of copying and hashing after the last
byte had arrived (0.80 of the link); see docs/benchmarks-log.md.

So the fill's file only ever grows as a contiguous, hashed-in-order prefix.
That is why the helpers do not write into the fill's own file at their
offsets: readers in sibling processes follow a fill by its file's size
(fill/remote.py), and a file written ahead would show them holes as image
bytes. A range that starts ahead of the writer is served from the scratch
file as its segment arrives, that segment fetched next (fill/scratch.py); one
in a sibling process asks for its segment through a small file the fill
watches, and reads the fill's file (fill/wanted.py). The
cost is a second write of the later segments (in the page cache, and a kernel
copy) and, for the fill's duration, the scratch file on the same disk: about
``WINDOW`` x N segments (those between the writer and its connections, plus
any a range asked for ahead), since what has been copied is punched out
behind the writer. That is not counted by the capacity reservation (it is
small beside the image, and gone when the fill ends); on a filesystem that
cannot punch holes it grows to the image's size, as it did before. The file
has no name, so a crash leaves nothing behind.

Everything else is a fill's as before: the fill lock on ``incomplete/<id>`` is
taken before any segment starts (one fill per image across processes), the
same size and hash verification runs before the commit, and a segment that
fails (after its own resumes), is short, or is long fails the whole fill, so
nothing is committed and its clients get the error a one-stream fill gives.
A background fill's helpers ask the same bandwidth bucket before every chunk
(fill/bandwidth.py), so the cap holds for all N connections together, and a
pause longer than ``RELEASE_AFTER`` closes every segment's connection; each
reopens where it stopped, checked as a resume (fill/pump.py, upstreams/resume.py).

The directory upstream is never segmented (``plan`` is asked only for fills
read with ``stream``; a local file has no per-connection limit). Off by
default (``fill_segments = 1``): a one-stream fill, exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from imagecache.errors import CacheStoreError, UpstreamError
from imagecache.fill.config import FillConfig
from imagecache.fill.events import FillEvents
from imagecache.fill.flight import REMOTE_POLL_INTERVAL, Flight
from imagecache.fill.pump import (
    Run,
    Throttle,
    aclose,
    copy_stream,
    count_read,
    next_chunk,
)
from imagecache.fill.scratch import ALIGN, Scratch, Segment, libc_fallocate
from imagecache.fill.wanted import Wants, wanted_path
from imagecache.fill.writer import FillWriter
from imagecache.upstreams.base import Caller, Upstream
from imagecache.upstreams.resume import releasable

log = logging.getLogger(__name__)

Span = tuple[int, int | None]
# How many segments per connection a fill fetches past its frontier, at most (fill/scratch.py).
WINDOW = 2


@dataclass(frozen=True)
class Plan:
    """How a fill reads its image: these ``[start, end)`` spans, over this many connections."""

    spans: list[Span]
    connections: int

    @property
    def single(self) -> bool:
        """One whole-image stream: not segmented."""
        return len(self.spans) == 1


def plan_for(writer: FillWriter, config: FillConfig) -> Plan:
    """``plan`` for a fill: segmented only if the origin promised a hash of the image.

    Each segment's resumes are checked against that segment's first answer
    (upstreams/resume.py), but nothing ties one segment's answer to
    another's: an image replaced at the origin between two segment requests
    would be spliced. The promised hash is what catches that, so without one
    the fill reads one stream, as before.
    """
    size = writer.expected_size if writer.expected_hash is not None else None
    return plan(size, config)


def plan(size: int | None, config: FillConfig) -> Plan:
    """The segments to read an image of ``size`` in; one span: not segmented."""
    step = max(ALIGN, config.fill_segment_size // ALIGN * ALIGN)
    if config.fill_segments <= 1 or size is None or size < 2 * config.fill_segment_size:
        return Plan([(0, None)], 1)
    # Starts on ALIGN boundaries: page-aligned kernel copies and mappings.
    spans: list[Span] = list(itertools.pairwise([*range(0, size, step), size]))
    return Plan(spans, config.fill_segments)


async def copy_segments(
    flight: Flight,
    writer: FillWriter,
    upstream: Upstream,
    caller: Caller,
    plan: Plan,
    run: Run,
    events: FillEvents,
    check: Callable[[], None],
    throttle: Throttle | None = None,
    lock_dir: Path | None = None,
) -> None:
    """Fill ``writer`` from ``upstream`` as ``plan`` says; one span is a plain stream.

    ``lock_dir``: the cache's, where siblings' ranges ask for segments (fill/wanted.py).
    """
    spans = plan.spans
    if plan.single:
        start, end = spans[0]
        stream = upstream.stream(flight.image_id, caller, start, end)
        await copy_stream(flight, writer, stream, run, events, check, throttle)
        return
    first_end = spans[0][1]
    assert first_end is not None
    segments = [Segment(start, end) for start, end in spans[1:] if end is not None]
    await run(libc_fallocate)  # found once per process: ldconfig in a thread, not on the loop
    path = None if lock_dir is None else wanted_path(lock_dir, flight.image_id)
    try:
        # One trip to the disk executor for both files: segment 0 waits on it.
        opened = await run(_open_files, writer, path, flight.fd)
    except OSError as exc:
        # A disk that cannot take the scratch file may still take the fill.
        log.warning(
            "no scratch file for %s (%s); filling it over one connection", flight.image_id, exc
        )
        single = Plan([(0, None)], 1)
        await copy_segments(flight, writer, upstream, caller, single, run, events, check, throttle)
        return
    assert isinstance(opened, tuple)
    fd, wants = opened
    scratch = Scratch(fd, flight, segments, WINDOW * plan.connections)

    def going() -> None:
        check()
        for segment in segments:
            if segment.error is not None:
                raise segment.error

    async def take_segments() -> None:
        while (segment := await scratch.take()) is not None:
            args = (upstream, caller, scratch, run, events, check, throttle)
            await _fetch(flight.image_id, segment, *args)
            if segment.error is not None:
                return

    def start_helper() -> None:
        helpers.append(
            asyncio.create_task(take_segments(), name=f"fill {flight.image_id} segments")
        )

    helpers: list[asyncio.Task[None]] = []
    flight.scratch = scratch  # ranges ahead of the frontier read from it (fill/scratch.py)
    if wants is not None:
        helpers.append(
            asyncio.create_task(_heed(wants, scratch), name=f"fill {flight.image_id} wants")
        )
    try:
        for _ in range(min(plan.connections, len(plan.spans)) - 1):
            start_helper()
        stream = upstream.stream(flight.image_id, caller, 0, first_end)
        await copy_stream(flight, writer, stream, run, events, going, throttle)
        if writer.received != first_end:
            raise UpstreamError(
                f"segment 0 of {flight.image_id!r} ended at byte {writer.received}, not {first_end}"
            )
        start_helper()  # segment 0's connection is free
        progress = scratch.progress
        for segment in segments:
            while writer.received < segment.end:
                going()
                ready = segment.start + segment.written - writer.received
                if ready <= 0:
                    progress.clear()
                    if segment.start + segment.written - writer.received <= 0:
                        await progress.wait()
                    continue
                hole = scratch.punchable()
                await _settled(run(_take, writer, scratch, ready, hole))
                flight.advance(writer.received)
                scratch.moved()  # a connection held by the window may go on
    finally:
        flight.scratch = None
        for helper in helpers:
            helper.cancel()
        # Every helper's disk call has returned before the scratch file closes.
        await asyncio.gather(*helpers, return_exceptions=True)
        scratch.close()  # once no range sends from it
        if wants is not None:
            await run(wants.close)  # before the fill lock goes: no other owner yet


def _open_files(
    writer: FillWriter, path: Path | None, fill_fd: int | None
) -> tuple[int, Wants | None]:
    """In a thread: the scratch file, and the file siblings' ranges ask in (None if not made)."""
    fd = writer.scratch_file()
    if path is None or fill_fd is None:
        return fd, None
    try:
        return fd, Wants(path, os.fstat(fill_fd).st_ino)
    except OSError as exc:  # sibling ranges then wait for the frontier, as before
        log.warning("no wanted-segments file for %s: %s", writer.image_id, exc)
        return fd, None


async def _heed(wants: Wants, scratch: Scratch) -> None:
    """Ask ``scratch`` for every segment a sibling's range wants, until the fill stops."""
    while not scratch.closed:
        if wants.grown():  # an fstat; the read below is of a few bytes in the page cache
            for offset in wants.take():
                log.info(
                    "fill of %s: a range in another process asks for byte %d",
                    scratch.flight.image_id,
                    offset,
                )
                scratch.want(offset)
        await asyncio.sleep(REMOTE_POLL_INTERVAL)


def _take(writer: FillWriter, scratch: Scratch, ready: int, hole: tuple[int, int] | None) -> None:
    """In a thread: punch ``hole``, then move up to ``ready`` bytes at the writer's position.

    A failure of the scratch file is one of the cache's disk (``CacheStoreError``):
    the fill's readers then finish from the origin, as with a full disk.
    """
    scratch.punch(hole)
    offset = writer.received
    fd = scratch.fd

    def copy_into(target: int, count: int) -> int:
        return os.copy_file_range(fd, target, min(count, ready), offset)

    def readinto(buffer: memoryview) -> int:
        try:
            return os.preadv(fd, [buffer[:ready]], offset)
        except OSError as exc:
            raise CacheStoreError(
                f"reading the scratch file of {writer.image_id!r}: {exc}"
            ) from exc

    moved = writer.copy_from(copy_into)
    if moved is None:
        moved = writer.write_from(readinto)
    if not moved:
        raise CacheStoreError(f"the scratch file of {writer.image_id!r} ended at byte {offset}")


async def _fetch(
    image_id: str,
    segment: Segment,
    upstream: Upstream,
    caller: Caller,
    scratch: Scratch,
    run: Run,
    events: FillEvents,
    check: Callable[[], None],
    throttle: Throttle | None,
) -> None:
    """One helper: read ``segment`` from the origin into the scratch file at its offsets."""
    length = segment.end - segment.start
    stream = upstream.stream(image_id, caller, segment.start, segment.end)
    try:
        with releasable() as handle:  # a pause closes the connection (fill/pump.py)
            while (got := await next_chunk(stream, throttle, run, events, handle)) is not None:
                chunk, background = got
                check()
                if segment.written + len(chunk) > length:
                    raise UpstreamError(
                        f"the origin sent more than segment {segment.start} of {image_id!r}"
                    )
                offset = segment.start + segment.written
                await _settled(run(_pwrite_all, scratch.fd, chunk, offset))
                count_read(len(chunk), background, throttle, events)
                scratch.wrote(segment, len(chunk))
        if segment.written != length:
            raise UpstreamError(
                f"segment {segment.start} of {image_id!r} ended after {segment.written}"
                f" of {length} bytes"
            )
    except Exception as exc:  # the fill's own task raises it (``going``)
        segment.error = exc
        scratch.progress.set()
    finally:
        await aclose(stream)


async def _settled(pending: Awaitable[object]) -> None:
    """Await a disk call; if cancelled, still wait for the thread to be done with the file."""
    future = asyncio.ensure_future(pending)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    except OSError as exc:  # the cache's disk, not the origin: see ``_take``
        raise CacheStoreError(f"writing a segment to the scratch file: {exc}") from exc
