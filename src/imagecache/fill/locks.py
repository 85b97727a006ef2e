"""The one place that asks the kernel who holds a fill's lock.

A writer holds ``flock(LOCK_EX)`` on its file (an incomplete fill, a capacity
reservation ticket) for as long as it works on it; the kernel drops the lock
when the writer's process dies. So "is somebody still writing this?" is one
non-blocking ``flock`` on a descriptor of the file, never a pid file or a
timestamp. Both probes here never wait: they run on the event loop as well
as in threads.
"""

from __future__ import annotations

import fcntl


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
