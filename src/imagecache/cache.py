"""``ImageCache``: the facade every front end (service, CLI, prefetcher) talks to.

It adds to a driver what no driver should know: teeing a stream into the cache
while it is consumed, verifying the bytes before they are committed, pruning
and cleaning under cross-process locks, and the queue.

Failure rules (Glance's, sharpened):

- A mismatch of size or hash is the consumer's problem: the stream raises
  ``VerificationError`` and the file goes to ``invalid/``. The last chunk is
  held back until verification passes, so a consumer never receives a complete
  but wrong body.
- A failure of the cache's own disk or metadata is not the consumer's problem:
  it is logged, the cache copy is dropped, and the stream goes on.
- An upstream failure mid-stream propagates to the consumer; nothing is cached.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import resource
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, Protocol

from imagecache.drivers import create_driver
from imagecache.drivers.base import Driver, WriteTarget
from imagecache.drivers.files import FileBackedDriver
from imagecache.errors import ImageBeingCached, ImageCacheError, VerificationError
from imagecache.layout import rename_if_exists
from imagecache.records import (
    HASH_ALGORITHMS,
    CachedImage,
    Chunk,
    CleanResult,
    ImageInfo,
    PruneResult,
    QueueResult,
)
from imagecache.settings import Settings

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024
# How many chunks the hash thread may lag behind the writer. The hash is the
# slowest step of a fill, so it must never wait for input: a backlog of several
# chunks absorbs the jitter of reads and writes (one chunk, lock-step, left the
# hash idle whenever a read or write ran long). Bounded, so memory is too.
HASH_BACKLOG = 8
# madvise(2) advice to fault a mapping's pages in (Linux 5.14); the mmap module
# of Python 3.11 has no name for it.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class _Hash(Protocol):
    @property
    def name(self) -> str: ...

    def update(self, data: Chunk, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class _FileSpan:
    """Bytes already in the cache file, to be hashed from the page cache."""

    fd: int
    offset: int
    count: int


class _Hasher:
    """A digest fed in order by its own thread, at most ``HASH_BACKLOG`` chunks behind.

    One thread per fill rather than a shared pool: a fill's chunks must be
    hashed in order, and a dedicated thread takes each one without the
    scheduling a pool adds per task. ``submit`` blocks only when the backlog is
    full. ``done`` callbacks run in the hash thread once a chunk is hashed (the
    fill pump uses them to reuse its buffers). A ``_FileSpan`` submitted in
    place of a chunk is hashed from the cache file, through a read-only
    mapping: the bytes a kernel copy put there.
    """

    def __init__(self, digest: _Hash, nice: int | None = None) -> None:
        self.digest = digest
        self._nice = nice
        self._queue: queue.SimpleQueue[
            tuple[Chunk | _FileSpan, Callable[[], None] | None] | None
        ] = queue.SimpleQueue()
        self._room = threading.Semaphore(HASH_BACKLOG)
        self._stopping = False
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="imagecache-hash", daemon=True)
        self._thread.start()

    def submit(self, data: Chunk | _FileSpan, done: Callable[[], None] | None = None) -> None:
        self._room.acquire()
        self._queue.put((data, done))

    def _run(self) -> None:
        if self._nice is not None:
            _set_thread_nice(self._nice)
        while (item := self._queue.get()) is not None:
            data, done = item
            try:
                if self._stopping or self._error is not None:
                    pass
                elif isinstance(data, _FileSpan):
                    self._update_from_file(data)
                else:
                    self.digest.update(data)
            except Exception as exc:  # kept for join(); the thread must go on releasing
                self._error = exc
            finally:
                self._room.release()
                if done is not None:
                    done()

    def _update_from_file(self, span: _FileSpan) -> None:
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


def _set_thread_nice(nice: int) -> None:
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


def choose_digest(info: ImageInfo | None) -> tuple[str, str | None]:
    """The algorithm to compute for a fill and the value expected, strongest first.

    Only the strongest hash the origin gives is checked: it alone decides
    whether the bytes are right, and hashing twice would halve fill speed.
    With no hash from the origin we still compute sha256 (the fastest strong
    hash here), so every entry has a recorded hash for scrubbing.
    """
    if info is not None:
        algo = (info.hash_algo or "").lower()
        if info.hash_value and algo in HASH_ALGORITHMS:
            return algo, info.hash_value.lower()
        if info.checksum:
            return "md5", info.checksum.lower()
    return "sha256", None


class FillWriter:
    """One image's bytes on their way into the cache: hash, write, verify, commit.

    Used from synchronous code (``get_caching_iter``) and from the service,
    which calls ``write``/``finish`` in a worker thread. If no cache copy can
    be written (another writer holds the fill, the disk fails) the writer keeps
    verifying, so the consumer is still protected.
    """

    def __init__(self, cache: ImageCache, image_id: str, info: ImageInfo | None) -> None:
        self.cache = cache
        self.image_id = image_id
        self.info = info
        algo, self.expected_hash = choose_digest(info)
        self.digest: _Hash = hashlib.new(algo, usedforsecurity=False)
        self.expected_size = info.size if info is not None else None
        self.received = 0
        self._stack = contextlib.ExitStack()
        self._target: WriteTarget | None = None
        self._hasher: _Hasher | None = None
        # Buffers of write_from(), returned by the hash thread once hashed.
        self._free: queue.SimpleQueue[bytearray] | None = None
        self._buffers = 0
        self._verified_hash: str | None = None
        self.committed = False

    @property
    def caching(self) -> bool:
        """Whether a cache copy is still being written."""
        return self._target is not None

    def open(self) -> bool:
        """Start writing the cache copy; False if this fill only verifies."""
        try:
            self._target = self._stack.enter_context(
                self.cache.driver.open_for_write(self.image_id)
            )
        except ImageBeingCached:
            log.info("image %s is being cached by another writer; streaming only", self.image_id)
        except (OSError, ImageCacheError) as exc:
            log.error("cannot start caching image %s: %s; streaming only", self.image_id, exc)
        if self._target is not None:
            # Hashed in its own thread while this one reads and writes; a
            # verify-only fill has nothing to overlap the hash with.
            self._hasher = _Hasher(self.digest, self.cache.hash_nice)
        return self.caching

    def write(self, chunk: Chunk, done: Callable[[], None] | None = None) -> None:
        """Account, hash and (if caching) store one chunk.

        ``chunk`` must stay unchanged until ``done`` is called (from the hash
        thread) or, without ``done``, for good: pass immutable bytes then.
        """
        self.received += len(chunk)
        if self.expected_size is not None and self.received > self.expected_size:
            raise VerificationError(self.image_id, "size", self.expected_size, self.received)
        if self._hasher is not None:
            self._hasher.submit(chunk, done)
            done = None
        else:
            self.digest.update(chunk)
        if self._target is not None:
            try:
                self._target.write(chunk)
            except Exception as exc:
                self._drop(exc)
        if done is not None:
            done()

    def write_from(self, readinto: Callable[[memoryview], int]) -> int:
        """Read the next chunk with ``readinto`` into a buffer of ours and write it.

        Returns the bytes read, 0 at the end. The buffers are reused once the
        hash thread is done with them, so a fill that reads from a blocking
        source allocates nothing per chunk.
        """
        if self._free is None:
            self._free = queue.SimpleQueue()
        free = self._free
        try:
            buffer = free.get_nowait()
        except queue.Empty:
            # Made only as the backlog needs them (a small image, or a hash
            # thread that keeps up, needs one or two): many fills at once
            # must not cost nine buffers each.
            if self._buffers < HASH_BACKLOG + 1:
                self._buffers += 1
                size = CHUNK_SIZE
                if self.expected_size is not None:
                    size = max(1, min(size, self.expected_size - self.received + 1))
                buffer = bytearray(size)
            else:
                buffer = free.get()
        try:
            count = readinto(memoryview(buffer))
        except BaseException:
            free.put(buffer)
            raise
        if not count:
            free.put(buffer)
            return 0
        self.write(memoryview(buffer)[:count], lambda: free.put(buffer))
        return count

    def copy_from(self, copy_into: Callable[[int, int], int | None]) -> int | None:
        """Have ``copy_into(fd, count)`` put the next chunk into the cache file in the kernel.

        The hash thread then reads those bytes from the page cache, so they
        never pass through a buffer of ours: measured in docs/benchmarks-log.md as
        the cheapest way to fill from a local file. Returns the bytes copied,
        0 at the end, or None when there is no kernel copy to make (a verify-only
        fill, a source that cannot, a copy that failed): ``write_from`` then
        carries on from where the copies stopped.
        """
        target, hasher = self._target, self._hasher
        if target is None or hasher is None:
            return None
        fd, offset = target.fileno(), self.received
        try:
            count = copy_into(fd, CHUNK_SIZE)
        except OSError as exc:
            # Debug only: an origin on another filesystem answers EXDEV to every
            # fill, and an error that matters (a full disk) comes back from the
            # read and write that follow, where it is reported.
            log.debug(
                "kernel copy into the cache copy of %s failed (%s); reading instead",
                self.image_id,
                exc,
            )
            return None
        if not count:
            return count
        self.received += count
        target.wrote(count)
        if self.expected_size is not None and self.received > self.expected_size:
            raise VerificationError(self.image_id, "size", self.expected_size, self.received)
        hasher.submit(_FileSpan(fd, offset, count))
        return count

    def _end_hash(self, *, discard: bool = False) -> None:
        hasher, self._hasher = self._hasher, None
        if hasher is not None:
            if discard:
                hasher.stop()
            else:
                hasher.join()

    def finish(self) -> None:
        """Verify everything received; commit the cache copy if there is one."""
        self.verify()
        self.commit()

    def verify(self) -> None:
        """Check size and hash of everything received; raises ``VerificationError``.

        Once this returns the bytes are known good: the service lets its
        readers have the last byte here, before ``commit``'s fsync, which only
        the cache needs.
        """
        self._end_hash()
        if self.expected_size is not None and self.received != self.expected_size:
            raise VerificationError(self.image_id, "size", self.expected_size, self.received)
        actual = self.digest.hexdigest()
        if self.expected_hash is not None and actual != self.expected_hash:
            raise VerificationError(self.image_id, self.digest.name, self.expected_hash, actual)
        self._verified_hash = actual

    def commit(self) -> None:
        """Make the verified cache copy an entry (if there is one); never raises for the disk."""
        actual = self._verified_hash
        if actual is None:
            raise ImageCacheError(f"the fill of {self.image_id!r} was committed unverified")
        if self._target is None:
            return
        target, self._target = self._target, None
        if self.digest.name == "md5":
            target.checksum = actual
        else:
            target.checksum = self.info.checksum if self.info is not None else None
            target.hash_algo, target.hash_value = self.digest.name, actual
        try:
            self._stack.close()  # commits
            self.committed = True
        except Exception as exc:
            log.error(
                "caching image %s failed at commit: %s; the stream was unaffected",
                self.image_id,
                exc,
            )

    def abort(self, exc: BaseException) -> None:
        """Roll back the cache copy (to ``invalid/``), if there is one."""
        with contextlib.suppress(Exception):
            self._end_hash(discard=True)  # no hash thread touches this writer afterwards
        self._roll_back(exc)

    def _roll_back(self, exc: BaseException) -> None:
        if self._target is None:
            return
        self._target = None
        try:
            self._stack.__exit__(type(exc), exc, exc.__traceback__)
        except BaseException as raised:
            if raised is not exc:
                log.error("rolling back the fill of %s failed: %s", self.image_id, raised)

    def _drop(self, exc: Exception) -> None:
        log.error(
            "writing the cache copy of %s failed: %s; dropping it, streaming on", self.image_id, exc
        )
        # The stream goes on and is still verified: the hash thread finishes
        # what it has (nothing is discarded), then hashing continues inline.
        self._end_hash()
        self._roll_back(exc)


class ImageCache:
    """The image cache of one directory, over the driver the settings name."""

    def __init__(self, settings: Settings, driver: Driver | None = None) -> None:
        self.settings = settings
        self.driver = driver if driver is not None else create_driver(settings)
        # The nice value for fills' hash threads, if this process may use it.
        self.hash_nice = usable_nice(settings.fill_hash_nice)

    def close(self) -> None:
        self.driver.close()

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _id(self, image_id: object) -> str:
        # Every id that enters through the facade is checked here, once, before
        # any driver sees it; drivers check again, but no driver can forget.
        return self.driver.layout.validate(image_id)

    # --- state and listings (the driver's answers) ----------------------------------------------

    def is_cached(self, image_id: str) -> bool:
        return self.driver.is_cached(self._id(image_id))

    def is_being_cached(self, image_id: str) -> bool:
        return self.driver.is_being_cached(self._id(image_id))

    def is_cacheable(self, image_id: str) -> bool:
        return self.driver.is_cacheable(self._id(image_id))

    def is_queued(self, image_id: str) -> bool:
        return self.driver.is_queued(self._id(image_id))

    def get_cache_size(self) -> int:
        return self.driver.get_cache_size()

    def get_hit_count(self, image_id: str) -> int:
        return self.driver.get_hit_count(self._id(image_id))

    def get_cached_images(self) -> list[CachedImage]:
        return self.driver.get_cached_images()

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        return self.driver.get_cached_image(self._id(image_id))

    def get_queued_images(self) -> list[str]:
        return self.driver.get_queued_images()

    def get_cached_nodes(self, image_id: str) -> list[str]:
        return self.driver.get_cached_nodes(self._id(image_id))

    def get_image_size(self, image_id: str) -> int:
        return self.driver.get_image_size(self._id(image_id))

    def open_for_read(self, image_id: str) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.driver.open_for_read(self._id(image_id))

    # --- changes ------------------------------------------------------------------------------

    def queue_image(self, image_id: str) -> QueueResult:
        return self.driver.queue_image(self._id(image_id))

    def delete_cached_image(self, image_id: str) -> bool:
        return self.driver.delete_cached_image(self._id(image_id))

    def cancel_fill(self, image_id: str) -> bool:
        """End a fill of ``image_id`` in progress uncommitted (its readers still get their bytes).

        For deletions (by an operator, or of the image at the origin), which
        must win over a fill that started before them; see
        ``FileBackedDriver.cancel_fill``. Call it before ``delete_cached_image``.
        """
        driver = self.driver
        if isinstance(driver, FileBackedDriver):  # every driver we ship
            return driver.cancel_fill(self._id(image_id))
        return False

    def delete_all_cached_images(self) -> int:
        return self.driver.delete_all_cached_images()

    def delete_queued_image(self, image_id: str) -> bool:
        return self.driver.delete_queued_image(self._id(image_id))

    def delete_all_queued_images(self) -> int:
        return self.driver.delete_all_queued_images()

    def pin(self, image_id: str) -> bool:
        return self.driver.set_pinned(self._id(image_id), True)

    def unpin(self, image_id: str) -> bool:
        return self.driver.set_pinned(self._id(image_id), False)

    def quarantine(self, image_id: str, why: str, *, inode: int | None = None) -> bool:
        """Move a committed file that is not what its record says to ``invalid/``; drop the record.

        The next request for the image fills it again from the origin; the
        bytes stay in ``invalid/`` for inspection until ``clean``. With
        ``inode``, only that file is moved: one a new fill has meanwhile
        committed in its place is left alone (False). Moved first, then
        forgotten: a crash in between leaves a record without a file, which
        reconciliation drops.
        """
        layout = self.driver.layout
        active = layout.active_path(self._id(image_id))
        if inode is not None:
            try:
                if os.stat(active).st_ino != inode:
                    return False
            except FileNotFoundError:
                return False
        log.error("image %s is damaged in the cache: %s; moved to invalid/", image_id, why)
        moved = rename_if_exists(active, layout.invalid_path(image_id))
        self.driver.delete_cached_image(image_id)
        return moved

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold a cache-wide lock (across threads and processes) for ``name``."""
        path = self.driver.layout.lock_path(name)
        with open(path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield

    def prune(self, max_size: int | None = None) -> PruneResult:
        """Evict least recently accessed, unpinned images until size <= max.

        Bounded: it walks one snapshot of the LRU order once, so it ends even if
        the metadata and the disk disagree (Glance's central driver could spin
        forever there).
        """
        limit = self.settings.image_cache_max_size if max_size is None else max_size
        with self.exclusive("prune"):
            current = self.driver.get_cache_size()
            files = freed = 0
            if current <= limit:
                return PruneResult(0, 0)
            for image_id, size in self.driver.iter_lru():
                if current <= limit:
                    break
                if self.driver.delete_cached_image(image_id):
                    files += 1
                    freed += size
                current -= size
            log.info("pruned %d images, %d bytes (limit %d)", files, freed, limit)
            return PruneResult(files, freed)

    def clean(self, stall_time: int | None = None) -> CleanResult:
        with self.exclusive("clean"):
            return self.driver.clean(stall_time)

    # --- filling --------------------------------------------------------------------------------

    def writer(self, image_id: str, info: ImageInfo | None = None) -> FillWriter:
        """A ``FillWriter`` for ``image_id`` (not yet opened)."""
        return FillWriter(self, self.driver.layout.validate(image_id), info)

    def should_cache(self, image_id: str, info: ImageInfo | None) -> bool:
        """Whether a fill of this image should write a cache copy at all.

        An incomplete file does not answer "no": its writer may be dead, and
        only ``open_for_write`` can tell (it takes a stale fill over and raises
        ``ImageBeingCached`` for a live one, which the caller streams through).
        """
        if self.driver.is_cached(self._id(image_id)):
            return False
        size = info.size if info is not None else None
        if size is not None and size > self.settings.largest_cacheable_image:
            log.info(
                "image %s (%d bytes) is above the largest cacheable size (%d); streaming only",
                image_id,
                size,
                self.settings.largest_cacheable_image,
            )
            return False
        return True

    def get_caching_iter(
        self, image_id: str, chunks: Iterable[bytes], info: ImageInfo | None = None
    ) -> Generator[bytes, None, None]:
        """Yield ``chunks`` while teeing them into the cache; verify before the last one."""
        writer = self.writer(image_id, info)
        if self.should_cache(image_id, info):
            writer.open()
        return self._tee(writer, chunks)

    @staticmethod
    def _tee(writer: FillWriter, chunks: Iterable[bytes]) -> Generator[bytes, None, None]:
        held: bytes | None = None
        try:
            for chunk in chunks:
                if not chunk:
                    continue
                writer.write(chunk)
                if held is not None:
                    yield held
                held = chunk
            writer.finish()
        except BaseException as exc:
            writer.abort(exc)
            raise
        if held is not None:
            yield held

    def cache_image_iter(
        self, image_id: str, chunks: Iterable[bytes], info: ImageInfo | None = None
    ) -> bool:
        """Drain ``chunks`` into the cache; False if the image was not cacheable."""
        if not self.should_cache(image_id, info):
            return False
        writer = self.writer(image_id, info)
        if not writer.open():
            return False
        for _ in self._tee(writer, chunks):
            pass
        return writer.committed

    def cache_image_file(
        self, image_id: str, source: IO[bytes], info: ImageInfo | None = None
    ) -> bool:
        """Cache the contents of a readable binary file."""
        return self.cache_image_iter(image_id, iter(lambda: source.read(CHUNK_SIZE), b""), info)


def file_chunks(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Read a file in chunks (a convenience for sources on local disk)."""
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            yield chunk
