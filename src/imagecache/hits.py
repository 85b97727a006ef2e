"""A committed entry opened to be served: its file, its record, and whether its commit is done.

A hit reads the file it opened, never a path again, so an eviction or a
refill meanwhile cannot change the bytes under a response. The record (size,
checksum, hash) gives a hit its ``Content-MD5`` and ``ETag``; a file without
one is either mid-commit (its writer holds the lock: wait for the record) or
was adopted or lost its record (served without them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from imagecache.cache import ImageCache
from imagecache.errors import ImageCacheError
from imagecache.fill.flight import COMMIT_WAIT, REMOTE_POLL_INTERVAL
from imagecache.fill.locks import locked_by_writer
from imagecache.layout import ImageId
from imagecache.records import CachedImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    handle: BinaryIO
    size: int
    record: CachedImage | None
    committing: bool = False  # a writer holds the file's lock: wait for its record


def open_hit(cache: ImageCache, image_id: ImageId) -> Hit | None:
    """In a thread: open the committed file and read its record (None on a miss)."""
    handle = cache.layout.open_committed(image_id)  # never through a symlink
    if handle is None:
        return None
    try:
        st = os.fstat(handle.fileno())
        # The lock first, then the record: a writer records before it unlocks,
        # so a lock found free means the record read next is the file's. Read
        # the other way round, a commit finishing between the two reads left
        # no record and no lock, and the hit went out without its ETag or
        # Content-MD5 (a 200 instead of a 304 for If-None-Match).
        committing = locked_by_writer(handle.fileno())
        record = cache.get_cached_image(image_id)
    except BaseException:
        handle.close()
        raise
    if record is None:
        # Committing: the caller waits for the record. Else a file without a
        # record (adopted, or the driver lost it): served without ETag.
        return Hit(handle, st.st_size, None, committing=committing)
    if record.size != st.st_size:
        if committing:
            # A fill renamed its file (a new one, or over an older entry) and
            # has not yet recorded it: the caller waits for that commit.
            return Hit(handle, st.st_size, None, committing=True)
        # Cut short (or grown) behind the cache's back: served, it would be a
        # 200 with the short length and the whole image's ETag. A miss instead:
        # the caller refills it from the origin.
        handle.close()
        try:
            cache.quarantine(
                image_id,
                f"its file has {st.st_size} bytes, its record {record.size}",
                inode=st.st_ino,
            )
        except (OSError, ImageCacheError) as exc:  # a read-only disk: still never served
            log.error("could not quarantine the damaged cache file of %s: %s", image_id, exc)
        return None
    return Hit(handle, st.st_size, record)


async def open_hit_off_loop(
    run: Callable[..., asyncio.Future[Hit | None]], cache: ImageCache, image_id: str
) -> Hit | None:
    """``open_hit`` in ``run``'s thread; a request cancelled meanwhile still closes the file.

    Without the shield, a cancelled request dropped the ``Hit`` its thread
    had just opened: the descriptor was left to the garbage collector (a
    ``ResourceWarning``, seen when a test's server shut down mid-request).
    """
    opening = run(open_hit, cache, image_id)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_unclaimed)
        raise


def _close_unclaimed(opening: asyncio.Future[Hit | None]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        hit = opening.result()
        if hit is not None:
            hit.handle.close()  # on the loop: a read-only descriptor, closed at once


async def close_hit(hit: Hit, run: Callable[..., asyncio.Future[None]]) -> None:
    """Close the hit's file in ``run``'s thread, also when the request is cancelled meanwhile.

    Shielded: cancelling the await must not cancel the close itself (a
    close still queued in the executor is dropped, file and all, by a cancel).
    """
    await asyncio.shield(run(hit.handle.close))


async def await_commit(hit: Hit) -> None:
    """Wait (at most ``COMMIT_WAIT``) until no writer holds the lock of ``hit``'s file.

    Polled like a fill in another process: flock on an open descriptor,
    non-blocking, never waits on the disk, so it runs on the loop.
    """
    deadline = time.monotonic() + COMMIT_WAIT
    # No event to wait on: the writer may be another process, which tells us
    # nothing but its lock.
    while locked_by_writer(hit.handle.fileno()) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(REMOTE_POLL_INTERVAL)


async def record_hit(
    cache: ImageCache, image_id: ImageId, run: Callable[..., asyncio.Future[None]]
) -> None:
    """Count a hit of ``image_id`` (its LRU order and hit count); ``run``: off the loop."""
    try:
        await run(cache.record_hit, image_id)
    except Exception as exc:  # a hit counter must never cost the client its image
        log.warning("recording a hit of %s failed: %s", image_id, exc)
