"""Moving an origin's bytes into a fill's writer, and telling the flight's readers.

Two ways, after what the upstream offers: an async stream whose chunks each
go to the disk executor (``copy_stream``), or a blocking source read by a
thread of its own (``pump``). Both call ``check`` around every write, which
raises to stop the fill (its clients left, or the cache's disk failed); the
coordinator decides what that means, this module only moves bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

from imagecache.errors import CacheStoreError
from imagecache.fill.events import FillEvents
from imagecache.fill.flight import Flight
from imagecache.fill.writer import FillWriter
from imagecache.upstreams.base import BlockingSource

# ``run(func, *args)``: a blocking call in the disk executor.
Run = Callable[..., Awaitable[object]]


async def copy_stream(
    flight: Flight,
    writer: FillWriter,
    stream: AsyncIterator[bytes],
    run: Run,
    events: FillEvents,
    check: Callable[[], None],
) -> None:
    """Fill from the upstream's async stream: each chunk goes to the disk executor."""
    try:
        async for chunk in stream:
            if not chunk:
                continue
            check()
            await run(writer.write, chunk)
            events.upstream_read(len(chunk))
            check()
            flight.advance(writer.received)
    finally:
        await aclose(stream)


async def pump(
    flight: Flight,
    writer: FillWriter,
    source: BlockingSource,
    events: FillEvents,
    check: Callable[[], None],
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
    written = [0]
    reported = 0
    pending = threading.Event()

    def report() -> None:
        nonlocal reported
        pending.clear()  # before reading: a write after this schedules a new report
        now = written[0]
        events.upstream_read(now - reported)
        reported = now
        flight.advance(now)

    def move() -> None:
        copying = True
        try:
            while not stop.is_set():
                check()
                count = writer.copy_from(source.copy_into) if copying else None
                if count is None:
                    copying = False
                    count = writer.write_from(source.readinto)
                if not count:
                    break
                check()
                written[0] += count
                if not pending.is_set():
                    pending.set()
                    loop.call_soon_threadsafe(report)
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


async def aclose(stream: AsyncIterator[bytes]) -> None:
    """Close an upstream's async generator now (releasing its connection), not at GC."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
