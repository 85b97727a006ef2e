"""A fill's hash: its own thread, its priority, and which hash of an image to trust.

The hash is the slowest step of a fill, so it runs in a thread of its own
(``Hasher``) beside the thread that reads and writes, fed in order through a
bounded backlog; ``fill_hash_nice`` may raise that thread's priority, checked
once at start-up (``usable_nice``). ``strongest_hash`` is the one rule for
which of an image's hashes counts.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import resource
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from imagecache.records import HASH_ALGORITHMS, Chunk, ImageInfo

log = logging.getLogger(__name__)

# How many chunks the hash thread may lag behind the writer. The hash is the
# slowest step of a fill, so it must never wait for input: a backlog of several
# chunks absorbs the jitter of reads and writes (one chunk, lock-step, left the
# hash idle whenever a read or write ran long). Bounded, so memory is too.
HASH_BACKLOG = 8
# madvise(2) advice to fault a mapping's pages in (Linux 5.14); the mmap module
# of Python 3.11 has no name for it.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class Hash(Protocol):
    @property
    def name(self) -> str: ...

    def update(self, data: Chunk, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class FileSpan:
    """Bytes already in the cache file, to be hashed from the page cache."""

    fd: int
    offset: int
    count: int


class Hasher:
    """A digest fed in order by its own thread, at most ``HASH_BACKLOG`` chunks behind.

    One thread per fill rather than a shared pool: a fill's chunks must be
    hashed in order, and a dedicated thread takes each one without the
    scheduling a pool adds per task. ``submit`` blocks only when the backlog is
    full. ``done`` callbacks run in the hash thread once a chunk is hashed (the
    fill pump uses them to reuse its buffers). A ``FileSpan`` submitted in
    place of a chunk is hashed from the cache file, through a read-only
    mapping: the bytes a kernel copy put there.
    """

    def __init__(self, digest: Hash, nice: int | None = None) -> None:
        self.digest = digest
        self._nice = nice
        self._queue: queue.SimpleQueue[
            tuple[Chunk | FileSpan, Callable[[], None] | None] | None
        ] = queue.SimpleQueue()
        self._room = threading.Semaphore(HASH_BACKLOG)
        self._stopping = False
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="imagecache-hash", daemon=True)
        self._thread.start()

    def submit(self, data: Chunk | FileSpan, done: Callable[[], None] | None = None) -> None:
        self._room.acquire()
        self._queue.put((data, done))

    def _run(self) -> None:
        if self._nice is not None:
            set_thread_nice(self._nice)
        while (item := self._queue.get()) is not None:
            data, done = item
            try:
                if self._stopping or self._error is not None:
                    pass
                elif isinstance(data, FileSpan):
                    self._update_from_file(data)
                else:
                    self.digest.update(data)
            except Exception as exc:  # kept for join(); the thread must go on releasing
                self._error = exc
            finally:
                self._room.release()
                if done is not None:
                    done()

    def _update_from_file(self, span: FileSpan) -> None:
        # A mapping reads the page cache in place (the bytes were just written,
        # so they are there); reading them back into a buffer would add the
        # copy the kernel copy saved. Mappings start on a page boundary.
        start = span.offset - span.offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(
            span.fd, span.offset + span.count - start, prot=mmap.PROT_READ, offset=start
        ) as mapped:
            # Faulting the pages in up front turns a page that cannot be read
            # (a disk error, a file cut short) into an OSError here instead of
            # a SIGBUS in the middle of the hash. Kernels before 5.14 lack it.
            try:
                mapped.madvise(_MADV_POPULATE_READ)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            with memoryview(mapped) as view, view[span.offset - start :] as part:
                self.digest.update(part)

    def join(self) -> None:
        """Wait until every submitted chunk is hashed; the thread ends."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """End the thread without hashing what is still queued (the fill is abandoned)."""
        self._stopping = True
        self.join()


def set_thread_nice(nice: int) -> None:
    """Give the calling thread (alone: Linux keeps a nice value per thread) ``nice``."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except PermissionError as exc:  # allowed at start-up (usable_nice), refused now
        log.debug("cannot set the hash thread's nice value to %d: %s", nice, exc)


_CAP_SYS_NICE = 23


def usable_nice(nice: int | None) -> int | None:
    """``nice`` if this process may give its threads that value, else None (with a warning).

    A thread may always lower its priority. Raising it needs CAP_SYS_NICE, or
    an RLIMIT_NICE soft limit of at least ``20 - nice`` (systemd's
    ``LimitNICE=``). Checked once, here, so a refusal is said once rather than
    met by every fill.
    """
    if nice is None or nice >= os.getpriority(os.PRIO_PROCESS, 0):
        return nice
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or 20 - soft <= nice or _has_capability(_CAP_SYS_NICE):
        return nice
    log.warning(
        "fill_hash_nice = %d is not applied: raising a thread's priority needs"
        " CAP_SYS_NICE or an RLIMIT_NICE of at least %d (systemd LimitNICE=)",
        nice,
        20 - nice,
    )
    return None


def _has_capability(bit: int) -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


def strongest_hash(
    checksum: str | None, hash_algo: str | None, hash_value: str | None
) -> tuple[str, str] | None:
    """The strongest ``(algorithm, lower-case hex value)`` known of an image, or None.

    The one picker: a fill's verification, the scrubber's re-hash and the
    service's ETag all choose the same hash of an image. A multihash of an
    algorithm we compute wins over the md5 ``checksum``.
    """
    algo = (hash_algo or "").lower()
    if hash_value and algo in HASH_ALGORITHMS:
        return algo, hash_value.lower()
    if checksum:
        return "md5", checksum.lower()
    return None


def choose_digest(info: ImageInfo | None) -> tuple[str, str | None]:
    """The algorithm to compute for a fill and the value expected, strongest first.

    Only the strongest hash the origin gives is checked: it alone decides
    whether the bytes are right, and hashing twice would halve fill speed.
    With no hash from the origin we still compute sha256 (the fastest strong
    hash here), so every entry has a recorded hash for scrubbing.
    """
    if info is not None:
        known = strongest_hash(info.checksum, info.hash_algo, info.hash_value)
        if known is not None:
            return known
    return "sha256", None
