"""Following a fill: what a reader of a flight may send, and the rest from the origin if it dies.

A follower (every download of an uncached image, the first one included)
iterates ``follow(flight, ...)``: ``Span``s of the growing file (sent with
sendfile, never copied through Python) when the image's size is known,
``bytes`` when it is not (a chunked body), and last one ``Ended`` saying how
the fill ended for this follower. No exception steers it: a fill's failure is
an ``End`` value, and only errors nobody meant (a bug, a cancel) propagate.

A fill that ends unfinished (its writer died, or this process's own disk
failed) leaves bytes that are right as far as they go. A follower that has
sent some may go on from the origin (``rest_of_body``, ``rest_of_range``),
which yields the origin's bytes and then its own ``Ended``. A fill that failed
verification, or another process's fill that failed for its own reasons,
leaves nothing to trust: its followers abort.

What the front end does with each ending (complete the body, look again,
stream uncached, abort the connection) is its decision (server/images.py);
this module knows no HTTP. Use every iterator here inside ``flight.reading()``,
which keeps the flight's file open.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagecache.errors import CacheStoreError, ImageCacheError, WriterGone
from imagecache.fill.events import FillEvents
from imagecache.fill.flight import READ_CHUNK, Flight, FlightKind
from imagecache.fill.pump import aclose
from imagecache.fill.writer import FillWriter
from imagecache.upstreams.base import Caller, Upstream

log = logging.getLogger(__name__)

# ``run(func, *args)``: a blocking call in the disk executor.
Run = Callable[..., asyncio.Future[Any]]


class End(enum.Enum):
    """How a follow ended."""

    COMPLETE = "complete"  # every byte asked for is sent, and may complete the body
    # The fill ended without a file: its writer died or stalled, or a fill of
    # another process was not committed. Before any byte, look again (a hit, or
    # a fill of one's own); after some, the rest may come from the origin.
    WRITER_GONE = "writer_gone"
    # This process's own cache disk failed under its fill. Before any byte,
    # stream from the origin uncached (another fill would meet the same disk);
    # after some, the rest may come from the origin.
    CACHE_FAILED = "cache_failed"
    FAILED = "failed"  # the bytes cannot be trusted (verification failed): abort

    @property
    def resumable(self) -> bool:
        """Whether the bytes sent are right as far as they go, so the origin may finish them."""
        return self in (End.WRITER_GONE, End.CACHE_FAILED)


@dataclass(frozen=True)
class Ended:
    """The last item of a follow: how it ended, and where."""

    end: End
    offset: int  # the offset of the next byte the follower would have sent
    sent: int  # bytes yielded (and so sent) before it ended
    error: ImageCacheError | None = None  # why, unless COMPLETE


@dataclass(frozen=True)
class Span:
    """``count`` bytes of the file open as ``fd``, from ``offset``, ready to send."""

    fd: int
    offset: int
    count: int


# What a follow yields: spans or bytes to send, and last how it ended.
Follow = AsyncGenerator["Span | bytes | Ended", None]


def _ending(flight: Flight, exc: ImageCacheError) -> End:
    if isinstance(exc, WriterGone):
        return End.WRITER_GONE
    if isinstance(exc, CacheStoreError) and flight.kind is FlightKind.LOCAL:
        return End.CACHE_FAILED
    return End.FAILED


async def follow(
    flight: Flight, run: Run, start: int = 0, stop: int | None = None
) -> AsyncGenerator[Span | bytes | Ended, None]:
    """Bytes ``[start, stop)`` of ``flight``'s image as they land, then an ``Ended``.

    ``stop`` None: to the end of the image. With a known size, spans of the
    file (``flight.spans`` holds back the image's last byte until the fill is
    verified); without one, bytes (the body is chunked, and what is held back
    is its terminating chunk, which the caller writes on ``COMPLETE``). A range
    of a segmented fill may also get spans of its scratch file, another ``fd``.
    """
    offset = start
    try:
        size = flight.size
        if size is None:
            async for chunk in flight.chunks(run, start):
                yield chunk
                offset += len(chunk)
        elif stop is not None and (scratch := flight.scratch) is not None:
            # A range of a segmented fill: what is ahead of the fill's file comes
            # from its scratch file, its segment fetched next (fill/scratch.py).
            async with contextlib.aclosing(scratch.spans(start, stop)) as pieces:
                async for held, at, count in pieces:
                    yield Span(held, at, count)
                    offset = at + count
        else:
            fd = flight.fd
            assert fd is not None, "a decided flight with readers keeps its file open"
            limit = size if stop is None else stop
            async with contextlib.aclosing(flight.spans(start)) as spans:
                async for at, count in spans:
                    count = min(count, limit - at)
                    yield Span(fd, at, count)
                    offset = at + count
                    if offset >= limit:
                        break
    except ImageCacheError as exc:
        yield Ended(_ending(flight, exc), offset, offset - start, exc)
        return
    yield Ended(End.COMPLETE, offset, offset - start)


async def relay(
    chunks: AsyncGenerator[bytes, None], verifier: FillWriter | None, run: Run, events: FillEvents
) -> AsyncGenerator[bytes | Ended, None]:
    """The origin's ``chunks``, then an ``Ended``; with a ``verifier``, the last only once verified.

    ``verifier`` is a writer that was never opened: it hashes, it stores
    nothing. An error of the origin (or of the verification) ends it
    ``FAILED``; what was yielded is all the client may have.
    """
    held: bytes | None = None
    sent = 0
    try:
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if not chunk:
                    continue
                events.upstream_read(len(chunk))
                if verifier is not None:
                    await run(verifier.write, chunk)
                if held is not None:
                    yield held
                    sent += len(held)
                held = chunk
        if verifier is not None:
            await run(verifier.verify)
    except ImageCacheError as exc:
        yield Ended(End.FAILED, sent, sent, exc)
        return
    if held is not None:
        yield held
        sent += len(held)
    yield Ended(End.COMPLETE, sent, sent)


async def failed_elsewhere(flight: Flight, invalid: Path, run: Run) -> bool:
    """Whether the other process's fill that ``flight`` followed failed, rather than died.

    ``invalid`` is where a failed fill's file goes: a writer moves it there
    before it lets go of its lock; one that died leaves it in ``incomplete/``.
    Only a dead writer's readers go on from the origin: a fill may fail because
    the origin changed the image (a refused resume, upstreams/resume.py), and
    the rest read from the origin from the reader's byte, with no version to
    hold it to, would be the new version's spliced onto the old (seen on the
    WAN rig, tests/wan/test_wan_fills.py; the final hash caught it only where the
    origin promised one).
    """
    fd = flight.fd
    if flight.kind is not FlightKind.REMOTE or fd is None:
        return False
    try:
        moved, ours = await run(lambda: (os.stat(invalid), os.fstat(fd)))
    except FileNotFoundError:
        return False
    return bool((moved.st_dev, moved.st_ino) == (ours.st_dev, ours.st_ino))


def rest_of_body(
    flight: Flight,
    upstream: Upstream,
    caller: Caller,
    verifier: FillWriter,
    run: Run,
    events: FillEvents,
    sent: int,
) -> AsyncGenerator[bytes | Ended, None]:
    """The rest of a body whose fill ended unfinished, from byte ``sent``: the origin's, verified.

    The client has bytes ``[0, sent)`` from the fill's file. They are hashed
    from that file, which nobody writes any more: its fill was rolled back, or
    its writer is dead (a process taking over a dead writer's fill starts a
    new file, drivers/files.py), and a writer only ever appends. The rest
    comes from the origin from byte ``sent``, and the last piece waits for the
    hash of the whole, as in a stream-through. Every follower of the failed
    fill reads the origin on its own: single-flight ends with the cache copy.
    """
    fd = flight.fd
    assert fd is not None, "a reader keeps the flight's file open"
    log.warning(
        "the fill of %s ended unfinished; continuing a download from the origin at byte %d",
        flight.image_id,
        sent,
    )

    async def hashed_first() -> AsyncGenerator[bytes, None]:
        stream = upstream.stream(flight.image_id, caller, sent)
        try:
            offset = 0
            while offset < sent:
                data = await run(os.pread, fd, min(READ_CHUNK, sent - offset), offset)
                if not data:
                    raise CacheStoreError(f"the cache file of {flight.image_id!r} shrank")
                await run(verifier.write, data)
                offset += len(data)
            async for chunk in stream:
                yield chunk
        finally:
            await aclose(stream)

    return relay(hashed_first(), verifier, run, events)


def rest_of_range(
    flight: Flight,
    upstream: Upstream,
    caller: Caller,
    run: Run,
    events: FillEvents,
    start: int,
    sent: int,
    end: int,
) -> AsyncGenerator[bytes | Ended, None]:
    """The rest of a range ``[start, end)`` whose fill ended unfinished: the origin's from ``sent``.

    A range has no checksum, so what the client already has from the
    unfinished fill's file (``[start, sent)``) is checked against the origin
    instead: the origin is read from the range's start, the bytes already sent
    are compared with the file's, and only if they all match does the rest
    follow (otherwise it ends ``FAILED``, and the client drops what it had).
    The range then holds exactly the origin's bytes, as one streamed through
    would. (Found by the crash soak, tests/test_soak.py: a range to the
    image's end that had every byte but the last when its writer was killed
    used to be aborted.)
    """
    fd = flight.fd
    assert fd is not None, "a reader keeps the flight's file open"
    log.warning(
        "the fill of %s ended unfinished; checking a range's first %d bytes against the"
        " origin and continuing from it",
        flight.image_id,
        sent - start,
    )

    async def past_matching() -> AsyncGenerator[bytes, None]:
        # The origin's bytes past what was sent, once those before it match the file's.
        stream = upstream.stream(flight.image_id, caller, start, end)
        try:
            offset = start
            async for chunk in stream:
                if offset >= sent:
                    yield chunk
                    continue
                mine = min(len(chunk), sent - offset)
                ours = await run(os.pread, fd, mine, offset)
                if ours != chunk[:mine]:
                    raise CacheStoreError(
                        f"bytes {offset}-{offset + mine - 1} sent from the unfinished fill differ"
                        " from the origin's"
                    )
                offset += len(chunk)
                if mine < len(chunk):
                    yield chunk[mine:]
        finally:
            await aclose(stream)

    return relay(past_matching(), None, run, events)


__all__ = [
    "End",
    "Ended",
    "Follow",
    "Span",
    "failed_elsewhere",
    "follow",
    "relay",
    "rest_of_body",
    "rest_of_range",
]
