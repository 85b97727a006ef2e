"""The one place that asks the kernel who holds a fill's lock.

A writer holds ``flock(LOCK_EX)`` on its file (an incomplete fill, a capacity
reservation ticket) for as long as it works on it; the kernel drops the lock
when the writer's process dies. So "is somebody still writing this?" is one
non-blocking ``flock`` on a descriptor of the file, never a pid file or a
timestamp. The probes here never wait: they run on the event loop as well
as in threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path


def locked_by_writer(fd: int) -> bool:
    """Whether a writer holds the exclusive lock on the file open as ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    # We got a shared lock: nobody writes. Drop it at once, or a takeover
    # writer's LOCK_EX would fail because of us.
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def take_if_unlocked(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` if no writer holds it; False if one does.

    The lock is kept (until ``fd`` is closed): for a caller that goes on to
    move or remove a dead writer's file, and must keep a new writer out meanwhile.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def held_or_removed(
    path: Path,
    gone: type[OSError] = FileNotFoundError,
    on_stale: Callable[[], None] | None = None,
) -> bool:
    """Whether a writer holds the lock of the file at ``path``; if none does, remove the file.

    For marker files whose writer holds their lock for as long as they mean
    something (capacity tickets, busy marks): unlocked, the writer died, and
    nobody else removes it. ``gone``: the errors that mean the file is not
    there (False), on opening or removing it. ``on_stale`` runs before a
    stale file is removed (a log line).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except gone:
        return False
    try:
        if locked_by_writer(fd):
            return True
        if on_stale is not None:
            on_stale()
        with contextlib.suppress(gone):
            os.unlink(path)
        return False
    finally:
        os.close(fd)
