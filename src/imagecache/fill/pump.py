"""Moving an origin's bytes into a fill's writer, and telling the flight's readers.

Two ways, after what the upstream offers: an async stream whose chunks each
go to the disk executor (``copy_stream``), or a blocking source read by a
thread of its own (``pump``). Both call ``check`` around every write, which
raises to stop the fill (its clients left, or the cache's disk failed); the
coordinator decides what that means, this module only moves bytes.

A fill with a ``Throttle`` asks its bucket before each chunk while it is a
background fill (fill/bandwidth.py): the thread sleeps, the stream awaits,
both in slices of at most ``RECHECK`` so that a client joining the fill, a
change of rate or a stop is seen within one slice. A blocking source that
can resume (``Releasable``) is released once paused for ``RELEASE_AFTER``:
its origin connection closes, and the next read reopens it at the first
byte not read. So is an async stream read inside ``releasable()`` (a
segmented fill's segments, ``copy_stream``): its resumable stream closes its
connection and reopens it the same way (upstreams/resume.py, ``Release``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from imagecache.errors import CacheStoreError
from imagecache.fill.bandwidth import RECHECK, RELEASE_AFTER, TokenBucket
from imagecache.fill.events import FillEvents
from imagecache.fill.flight import Flight
from imagecache.fill.writer import FillWriter
from imagecache.upstreams.base import BlockingSource, Releasable
from imagecache.upstreams.resume import Release, releasable

# ``run(func, *args)``: a blocking call in the disk executor.
Run = Callable[..., Awaitable[object]]


@dataclass(frozen=True)
class Throttle:
    """The bucket of the process's background fills, and whether this fill is one now."""

    bucket: TokenBucket
    # Asked before every chunk, from the pump's thread too: reads plain attributes only.
    applies: Callable[[], bool]
    # Blocking (a thread): looks whether another process is busy (fill/busy.py).
    refresh: Callable[[], None] = lambda: None

    def pending(self) -> float:
        """Seconds this fill must still wait before its next chunk (0: go)."""
        return self.bucket.delay() if self.applies() else 0.0


async def copy_stream(
    flight: Flight,
    writer: FillWriter,
    stream: AsyncIterator[bytes],
    run: Run,
    events: FillEvents,
    check: Callable[[], None],
    throttle: Throttle | None = None,
) -> None:
    """Fill from the upstream's async stream: each chunk goes to the disk executor."""
    try:
        with releasable() as handle:
            while (got := await next_chunk(stream, throttle, run, events, handle)) is not None:
                chunk, background = got
                check()
                await run(writer.write, chunk)
                count_read(len(chunk), background, throttle, events)
                check()
                flight.advance(writer.received)
    finally:
        await aclose(stream)


async def next_chunk(
    stream: AsyncIterator[bytes],
    throttle: Throttle | None,
    run: Run,
    events: FillEvents,
    handle: Release | None = None,
) -> tuple[bytes, bool] | None:
    """The stream's next non-empty chunk once ``throttle`` lets it come; None at its end.

    With it, whether the chunk is background bytes (decided before the read,
    as the wait was): the caller counts them with ``count_read`` once written.
    ``handle``: the stream's ``Release`` (``releasable``), used once paused
    for ``RELEASE_AFTER``.
    """

    async def release() -> bool:
        assert handle is not None
        return await release_stream(stream, handle)

    while True:
        if throttle is not None:
            await wait_async(throttle, run, events, release if handle is not None else None)
        background = throttle is not None and throttle.applies()
        try:
            chunk = await anext(stream)
        except StopAsyncIteration:
            return None
        if chunk:
            return chunk, background


def count_read(size: int, background: bool, throttle: Throttle | None, events: FillEvents) -> None:
    """Count ``size`` bytes read from the origin, and spend them from the bucket if background."""
    events.upstream_read(size)
    if background:
        assert throttle is not None
        throttle.bucket.spend(size)
        events.background_read(size)


async def pump(
    flight: Flight,
    writer: FillWriter,
    source: BlockingSource,
    events: FillEvents,
    check: Callable[[], None],
    throttle: Throttle | None = None,
) -> None:
    """Fill from a blocking source in a thread of its own, until the end of the image.

    The thread reads into the writer's buffers, writes and queues each chunk
    for the hash thread (or, from a source that can, has the kernel copy
    the chunk into the cache file and the hash thread read it from
    there); the event loop only hears of progress, at most one
    callback pending at a time, so readers wake as bytes land without the
    loop taking part in moving them. Measured against the per-chunk trips
    through the loop and the disk executor in docs/benchmarks-log.md.
    """
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    done: concurrent.futures.Future[None] = concurrent.futures.Future()
    # Written by the pump thread after each write, read by report() on the loop.
    # Likewise: [bytes written, of them while background, seconds held by the
    # throttle, connections released].
    written = [0, 0, 0.0, 0]
    reported = [0, 0, 0.0, 0]
    pending = threading.Event()

    def report() -> None:
        pending.clear()  # before reading: a write after this schedules a new report
        now = list(written)
        events.upstream_read(int(now[0] - reported[0]))
        if now[1] != reported[1]:
            events.background_read(int(now[1] - reported[1]))
        if now[2] != reported[2]:
            events.background_throttled(now[2] - reported[2])
        for _ in range(int(now[3] - reported[3])):
            events.background_released()
        reported[:] = now
        flight.advance(int(now[0]))

    def schedule_report() -> None:
        if not pending.is_set():
            pending.set()
            loop.call_soon_threadsafe(report)

    def wait_turn() -> None:
        # Sleeps on ``stop`` so that a cancelled fill is not held by its throttle.
        assert throttle is not None
        if throttle.applies():
            throttle.refresh()
        paused = 0.0  # seconds of this wait with the rate at 0
        while (delay := throttle.pending()) > 0 and not stop.is_set():
            started = time.monotonic()
            stop.wait(min(delay, RECHECK))
            waited = time.monotonic() - started
            written[2] += waited
            paused = paused + waited if math.isinf(delay) else 0.0
            if paused >= RELEASE_AFTER and release is not None and release():
                written[3] += 1
            schedule_report()
            throttle.refresh()

    release = source.release if isinstance(source, Releasable) else None

    def move() -> None:
        copying = True
        try:
            while not stop.is_set():
                check()
                if throttle is not None:
                    wait_turn()
                    if stop.is_set():
                        continue  # the loop's else: the fill was stopped
                background = throttle is not None and throttle.applies()
                count = writer.copy_from(source.copy_into) if copying else None
                if count is None:
                    copying = False
                    count = writer.write_from(source.readinto)
                if not count:
                    break
                check()
                written[0] += count
                if background:
                    assert throttle is not None
                    throttle.bucket.spend(count)
                    written[1] += count
                schedule_report()
            else:
                raise CacheStoreError(f"fill of {flight.image_id!r} stopped")
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        finally:
            source.close()

    threading.Thread(target=move, name=f"imagecache-fill-{flight.image_id}").start()
    waiting = asyncio.wrap_future(done)
    try:
        await asyncio.shield(waiting)
    except asyncio.CancelledError:
        # The writer must be idle before the caller rolls it back; a read
        # waiting on a stalled origin is woken rather than waited out.
        # Awaiting the same future also collects its error, which would
        # otherwise be reported "never retrieved" whenever it is collected.
        stop.set()
        source.interrupt()
        with contextlib.suppress(Exception):
            await waiting
        raise
    report()


async def wait_async(
    throttle: Throttle,
    run: Run,
    events: FillEvents,
    release: Callable[[], Awaitable[bool]] | None = None,
) -> None:
    """Wait while the throttle holds this fill; ``release`` its connection once paused long."""
    if throttle.applies():
        await run(throttle.refresh)
    paused = 0.0  # seconds of this wait with the rate at 0, as in ``pump``
    while (delay := throttle.pending()) > 0:
        started = time.monotonic()
        try:
            await asyncio.sleep(min(delay, RECHECK))
        finally:
            waited = time.monotonic() - started
            events.background_throttled(waited)
        paused = paused + waited if math.isinf(delay) else 0.0
        if paused >= RELEASE_AFTER and release is not None and await release():
            events.background_released()
        await run(throttle.refresh)


async def release_stream(stream: AsyncIterator[bytes], handle: Release) -> bool:
    """Close ``stream``'s origin connection now; its next read reopens it (resume.py).

    False if there is none to close: not resumable, not yet opened, already
    released, or every byte is in. The stream answers the read below with an
    empty chunk, having read nothing more from the origin.
    """
    if not handle.open:
        return False
    handle.wanted = True
    try:
        chunk = await anext(stream)
    except StopAsyncIteration:
        return False
    assert not chunk, "a released stream reads nothing more"
    return True


async def aclose(stream: AsyncIterator[bytes]) -> None:
    """Close an upstream's async generator now (releasing its connection), not at GC."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
