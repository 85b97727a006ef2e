"""The scratch file of a segmented fill: which segment next, ranges read ahead, holes punched.

A segmented fill (fill/segments.py) fetches its later segments into an unnamed
scratch file and copies them into the fill's own file in order. ``Scratch``
is that file's bookkeeping, on the event loop:

- **Which segment a free connection takes next** (``take``): one a range has
  asked for (``want``), first come first served, else the next in order, but
  no further than ``window`` segments past the fill's frontier. The window is
  what bounds the file: a connection that runs ahead while another is slow
  waits instead of filling the disk with segments the writer cannot copy yet.
- **Ranges that start ahead of the fill's frontier** (``spans``): a range on
  a segmented fill is served from the fill, never from a second origin read.
  Its bytes below the frontier come from the fill's file; those above it, as
  soon as its segment's connection has written them, from the scratch file
  itself, not copied ahead into the fill's file (which must grow only as a
  contiguous prefix: sibling processes follow it by its size, fill/remote.py).
  Waiting, the range asks for the segment it waits on, so the next free
  connection fetches it; a range in a sibling process asks through
  fill/wanted.py (``want`` too) and reads only the fill's file. A span of
  the scratch file being sent is *pinned*: its bytes are not punched out,
  and the file is not closed, until the send is done.
- **Holes punched behind the writer** (``punchable``, ``punch``): what has
  been copied into the fill's file is freed in the scratch file with
  ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``, so the file holds
  about the segments between the writer and its connections (at most
  ``window`` plus those ranges asked for), not the image. A filesystem that
  cannot punch (``EOPNOTSUPP``) is told once, in the log, and the file then
  grows as before; ext4, xfs, btrfs and tmpfs can.

The last byte of the image is never sent from here: it waits, as for every
reader, for the fill to be verified (fill/flight.py).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import errno
import functools
import logging
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass

from imagecache.fill.flight import Flight, FlightState

log = logging.getLogger(__name__)

# Segment starts fall on these boundaries (fill/segments.py); holes are punched in them.
ALIGN = 64 * 1024
# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
# How often a range waiting for a segment looks again without being told (a bound, not a sync).
RECHECK = 1.0


@dataclass
class Segment:
    """One ``[start, end)`` of the image fetched into the scratch file by one connection."""

    start: int
    end: int
    # Bytes of [start, start + written) are in the scratch file.
    written: int = 0
    taken: bool = False
    error: BaseException | None = None


@functools.cache
def libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's ``fallocate``, found on the first segmented fill rather than at import.

    ``find_library`` runs ``ldconfig -p`` in a subprocess: done at import, every
    start of the service paid for a fork, an exec and a parse (with ctypes'
    own import) that only a segmented fill uses (docs/benchmarks-log.md, start-up).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        func = ctypes.CDLL(name, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    func.restype = ctypes.c_int
    return func


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset + length)`` of ``fd``'s file, its size kept; raises ``OSError``.

    Python's ``os`` has no punch (``posix_fallocate`` only allocates), hence
    libc's ``fallocate`` through ctypes. Without it: ``ENOSYS``.
    """
    fallocate = libc_fallocate()
    if fallocate is None:
        raise OSError(errno.ENOSYS, "no fallocate in this C library")
    if fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        import ctypes  # loaded by libc_fallocate already

        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Scratch:
    """The scratch file ``fd`` of ``flight``'s segmented fill; ``segments``: all but the first."""

    def __init__(self, fd: int, flight: Flight, segments: list[Segment], window: int) -> None:
        self.fd = fd
        self.flight = flight
        self.segments = segments
        self._starts = [segment.start for segment in segments]
        self._step = segments[0].end - segments[0].start if segments else ALIGN
        self.window = window
        self._next = 0  # below this index every segment is taken
        self._asked: collections.deque[Segment] = collections.deque()
        # Told whenever a segment has more bytes (the writer waits on it).
        self.progress = asyncio.Event()
        self._moved = asyncio.Event()  # the frontier moved, or a range asked: takers look again
        # Scratch bytes below this are freed, or were never written (the first segment's).
        self._punched = segments[0].start if segments else 0
        self._punching = libc_fallocate() is not None
        self._pins: collections.Counter[int] = collections.Counter()
        self.waiting = 0  # ranges waiting on a segment: they are woken by its bytes
        self.closed = False
        self.asked = 0  # segments taken out of order for a range (tests, logs)

    # --- which segment next -----------------------------------------------------------

    def segment_at(self, offset: int) -> Segment | None:
        """The segment holding byte ``offset``; None in the first segment (not in this file)."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index < 0 or offset >= self.segments[index].end:
            return None
        return self.segments[index]

    def want(self, offset: int) -> None:
        """A range waits on byte ``offset``: its segment is fetched by the next free connection."""
        segment = self.segment_at(offset)
        if segment is None or segment.taken or segment in self._asked:
            return
        self._asked.append(segment)
        self.moved()

    def moved(self) -> None:
        """The frontier moved, or a range asked for a segment: waiting takers look again."""
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def take(self) -> Segment | None:
        """The segment a free connection fetches next; None when every one is taken."""
        while True:
            while self._asked:
                segment = self._asked.popleft()
                if not segment.taken:
                    self.asked += 1
                    log.debug(
                        "fill of %s: segment at byte %d fetched next, for a range",
                        self.flight.image_id,
                        segment.start,
                    )
                    return self._taken(segment)
            while self._next < len(self.segments) and self.segments[self._next].taken:
                self._next += 1
            if self._next == len(self.segments):
                return None
            segment = self.segments[self._next]
            if segment.start - self.flight.available < self.window * self._step:
                return self._taken(segment)
            await self._moved.wait()

    @staticmethod
    def _taken(segment: Segment) -> Segment:
        segment.taken = True
        return segment

    def wrote(self, segment: Segment, count: int) -> None:
        """``count`` more bytes of ``segment`` are in the file: tell the writer, waiting ranges."""
        segment.written += count
        self.progress.set()
        if self.waiting:
            self.flight.touch()

    # --- ranges read ahead -------------------------------------------------------------

    def ready(self, offset: int, limit: int) -> int:
        """Bytes from ``offset`` (below ``limit``) that this file holds now; 0 if none."""
        if self.closed:
            return 0
        segment = self.segment_at(offset)
        if segment is None:
            return 0
        return max(0, min(segment.start + segment.written, limit) - offset)

    @contextlib.contextmanager
    def pinned(self, offset: int) -> Iterator[None]:
        """While in the block, nothing from ``offset`` on is punched out, and ``fd`` stays open."""
        self._pins[offset] += 1
        try:
            yield
        finally:
            self._pins[offset] -= 1
            if not self._pins[offset]:
                del self._pins[offset]
            if self.closed and not self._pins:
                os.close(self.fd)

    async def spans(self, start: int, stop: int) -> AsyncGenerator[tuple[int, int, int], None]:
        """``(fd, offset, count)`` of bytes ``[start, stop)`` of the image, as they land anywhere.

        From the fill's file (``flight.fd``) where its frontier has passed, from
        this file where a segment's connection has written them; asks for the
        segment it waits on. Raises the fill's error if it fails. Use inside
        ``flight.reading()``.
        """
        flight = self.flight
        size = flight.size
        assert size is not None, "a segmented fill has a known size"
        offset = start
        while offset < stop:
            limit = flight.sendable()
            if offset < limit:
                fd = flight.fd
                assert fd is not None, "a decided flight with readers keeps its file open"
                count = min(limit, stop) - offset
                yield fd, offset, count
                offset += count
                continue
            if flight.state is FlightState.FAILED:
                assert flight.error is not None
                raise flight.error
            # The image's last byte waits for the verification, from the fill's file.
            count = self.ready(offset, min(stop, size - 1))
            if count:
                with self.pinned(offset):
                    yield self.fd, offset, count
                offset += count
                continue
            self.want(offset)
            self.waiting += 1
            try:
                await flight.progressed(RECHECK)
            finally:
                self.waiting -= 1

    # --- holes behind the writer -------------------------------------------------------

    def punchable(self) -> tuple[int, int] | None:
        """The span to punch next, ``(offset, length)``: copied into the fill's file, not pinned.

        Decided on the loop, after ``flight.advance``: a range that looks at an
        offset below the frontier from then on reads the fill's file, and one
        that pinned a span before holds the punch back (the lowest pin bounds
        it). Counted as punched at once; the caller punches it (``punch``).
        """
        if not self._punching:
            return None
        end = self.flight.available // ALIGN * ALIGN
        if self._pins:
            end = min(end, min(self._pins) // ALIGN * ALIGN)
        if end <= self._punched:
            return None
        span = (self._punched, end - self._punched)
        self._punched = end
        return span

    def punch(self, span: tuple[int, int] | None) -> None:
        """In a thread: punch ``span`` (from ``punchable``) out of the file, if there is one."""
        if span is None or not self._punching:
            return
        try:
            punch_hole(self.fd, *span)
        except OSError as exc:
            # The copy is whole without it: the file just keeps its bytes, as before.
            self._punching = False
            log.info(
                "cannot punch holes in the scratch file of %s (%s); it grows to the image's size",
                self.flight.image_id,
                exc,
            )

    def close(self) -> None:
        """The fill has stopped fetching: close the file once no range is sending from it."""
        if self.closed:
            return
        self.closed = True
        self.moved()
        self.flight.touch()
        if not self._pins:
            os.close(self.fd)


__all__ = ["ALIGN", "Scratch", "Segment", "punch_hole"]
