"""Segments wanted across processes: a range in a sibling worker asks a segmented fill for its part.

A range that starts ahead of a segmented fill's frontier is served from the
scratch file (fill/scratch.py), but only in the process that runs the fill:
the scratch file has no name, and its bookkeeping (which bytes each segment
has) lives on that process's loop. A range arriving at a sibling worker
(``--workers 2`` share the port) follows the fill by its file's size
(fill/remote.py), so before this it waited for the frontier within
``range_wait_limit`` or, far ahead, read its bytes from the origin a second time.

The choice, of the three ways considered:

- **A "segment wanted" file** (this module): the fill's owner makes
  ``.locks/wanted/<id>``, whose first 8 bytes are the inode of the fill's
  ``incomplete/<id>``; a sibling's range appends the offset it starts at
  (8 bytes, ``O_APPEND``: one atomic write) and then waits for the fill's
  frontier like any follower of a remote fill, without judging the fill's
  rate: its segment is fetched by the owner's next free connection and is in
  the scratch file by the time the writer gets there, so the frontier passes
  it at copy speed. The owner looks at the file's size every
  ``REMOTE_POLL_INTERVAL`` and asks its ``Scratch`` for each new offset.
- Naming the scratch file (under ``.locks/`` or through ``/proc/<pid>/fd``)
  so siblings read pieces from it would also serve the range before the
  frontier, but a sibling would need the segments' progress too (a second
  channel), ``/proc/<pid>/fd`` depends on the process's dumpable state, and a
  named scratch file is what a crash leaves behind, uncounted by the
  capacity reservation.
- Handing the range's bytes over a socket to the owner: a second data path.

So bytes still reach a sibling only through the fill's own file, which grows
as a verified-in-order prefix: nothing new can show it a hole. What is
shared is a wish, not data. Robust across crashes: the file is only believed
while the fill's lock is held (the sibling has a remote flight, i.e. found
``incomplete/<id>`` locked) *and* its header names that very file's inode, so
a file left by a crashed owner (a few bytes) is ignored, and replaced by the
next segmented fill of the image; the owner removes it when its segments are
done, before it lets go of the fill lock. One fill per image across processes
is unchanged: the channel never starts a fill, and the origin is asked by the
owner alone. A lost or late wish costs only time (the range then waits for
the frontier in order), never bytes.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

# Under the cache's lock directory (``.locks/``): hidden, never an image id.
SUBDIR = "wanted"
_RECORD = struct.Struct("<Q")


def wanted_path(lock_dir: Path, image_id: str) -> Path:
    return lock_dir / SUBDIR / image_id


class Wants:
    """The owner's side: the file siblings append offsets to, read as it grows (blocking calls)."""

    def __init__(self, path: Path, inode: int) -> None:
        path.parent.mkdir(exist_ok=True)
        self.path = path
        # Truncated: what a crashed owner left is replaced, header first.
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.pwrite(self.fd, _RECORD.pack(inode), 0)
        except BaseException:
            self.close()
            raise
        self._read = _RECORD.size

    def grown(self) -> bool:
        """Whether a sibling has appended since the last ``take`` (an ``fstat``: no disk wait)."""
        return os.fstat(self.fd).st_size >= self._read + _RECORD.size

    def take(self) -> list[int]:
        """The offsets appended since the last call, whole records only."""
        size = os.fstat(self.fd).st_size
        count = (size - self._read) // _RECORD.size
        if count <= 0:
            return []
        data = os.pread(self.fd, count * _RECORD.size, self._read)
        whole = len(data) // _RECORD.size * _RECORD.size
        self._read += whole
        return [offset for (offset,) in _RECORD.iter_unpack(data[:whole])]

    def close(self) -> None:
        """Remove the file (the fill lock is still held: no other owner can have made one)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)


def ask(path: Path, inode: int, offset: int) -> bool:
    """A sibling's side: ask the fill of the file ``inode`` for byte ``offset``'s segment.

    False when no segmented fill of that file listens (no file, or one left
    by another fill): the caller then judges the fill's rate as before.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        header = os.pread(fd, _RECORD.size, 0)
        if len(header) != _RECORD.size or _RECORD.unpack(header)[0] != inode:
            return False
        os.write(fd, _RECORD.pack(offset))
        return True
    finally:
        os.close(fd)


def asker(
    lock_dir: Path, image_id: str, fd: int, run: Callable[..., Awaitable[object]]
) -> Callable[[int], Awaitable[bool]]:
    """``ask`` the fill whose file ``fd`` reads, in the executor ``run``: a remote flight's."""
    path = wanted_path(lock_dir, image_id)
    inode = os.fstat(fd).st_ino

    async def ask_ahead(offset: int) -> bool:
        return bool(await run(ask, path, inode, offset))

    return ask_ahead


__all__ = ["SUBDIR", "Wants", "ask", "asker", "wanted_path"]
