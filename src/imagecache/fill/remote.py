"""Another process's fill, seen through its file and its lock.

A fill in a sibling worker process (or any process over the same cache
directory) holds an exclusive ``flock`` on ``incomplete/<id>`` while it
writes; the kernel drops the lock if that process dies. A process that wants
to share such a fill opens the file (``open_fill``) and polls its size and the
lock (``watch``): the fill is over when the lock is free, and it succeeded
exactly when ``<dir>/<id>`` is now the inode that was being read.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from imagecache.errors import WriterGone
from imagecache.fill.flight import REMOTE_POLL_INTERVAL, Flight
from imagecache.fill.locks import locked_by_writer

# How often a fill with no byte yet is looked at, and for how long (``next_poll``).
FIRST_BYTE_POLL = 0.002
FIRST_BYTE_SPAN = 0.5


def open_fill(incomplete: Path) -> int | None:
    """A read descriptor of ``incomplete`` if a writer holds its lock now, else None."""
    try:
        fd = os.open(incomplete, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    if not locked_by_writer(fd):
        os.close(fd)
        return None
    return fd


async def watch(flight: Flight, active: Path, stall_limit: float) -> None:
    """Follow another process's fill (``flight.fd``) to its end by polling its size and lock.

    ``active`` is where the image lands when committed; a fill that makes no
    progress for ``stall_limit`` seconds is given up on (its readers retry).
    """
    fd = flight.fd
    assert fd is not None
    inode = os.fstat(fd).st_ino
    last_progress = time.monotonic()
    watched = last_progress
    while True:
        # fstat and a non-blocking flock on an open fd never wait on the disk.
        size = os.fstat(fd).st_size
        if size > flight.available:
            flight.advance(size)
            last_progress = time.monotonic()
        if not locked_by_writer(fd):
            flight.advance(os.fstat(fd).st_size)
            if _inode_of(active) == inode:
                flight.finish(flight.available)
            else:
                flight.fail(WriterGone(f"the fill of {flight.image_id!r} was not committed"))
            return
        if time.monotonic() - last_progress > stall_limit:
            flight.fail(WriterGone(f"the fill of {flight.image_id!r} stalled"))
            return
        await asyncio.sleep(next_poll(flight.available, time.monotonic() - watched))


def next_poll(available: int, watching: float) -> float:
    """Seconds until the next look at another process's fill, ``watching`` s after the first.

    ``FIRST_BYTE_POLL`` while the file has no byte yet, for the first
    ``FIRST_BYTE_SPAN`` seconds: a herd's clients in this process have
    nothing to send until then, and a flat ``REMOTE_POLL_INTERVAL`` added up
    to 20 ms to their first byte (docs/benchmarks-log.md, "The herd's first
    byte"). Once bytes flow, each look wakes the followers to send what landed
    since the last, so the full interval (fewer, larger sends); and so does an
    origin slow to its first byte, past the span (no fast polls for seconds).
    """
    if available == 0 and watching < FIRST_BYTE_SPAN:
        return FIRST_BYTE_POLL
    return REMOTE_POLL_INTERVAL


def _inode_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
