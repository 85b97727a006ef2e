"""A fill's bytes on their way into the cache, and a verifier that only hashes.

``FillWriter`` is the one place with the rules of writing a fill: account
every byte, hash it (in the hash thread while caching), store it, verify size
and hash, then commit; a failure of the cache's own disk drops the copy and
goes on verifying. Every miss path uses it: the coordinator's fills, the
recovery of a follower from the origin, the stream-through and the library's
synchronous tee (cache.py).

``Verifier`` is a writer that stores nothing: it hashes what passes through
and checks it at the end (a stream-through, the rest of a dead fill).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

from imagecache.errors import (
    CacheStoreError,
    ImageBeingCached,
    ImageCacheError,
    VerificationError,
)
from imagecache.fill.hashing import HASH_BACKLOG, FileSpan, Hash, Hasher, choose_digest
from imagecache.layout import ImageId
from imagecache.records import Chunk, ImageInfo

if TYPE_CHECKING:
    from imagecache.drivers.base import Driver, WriteTarget

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024


class FillWriter:
    """One image's bytes on their way into the cache: hash, write, verify, commit.

    Used from synchronous code (``get_caching_iter``) and from the service,
    which calls ``write``/``finish`` in a worker thread. If no cache copy can
    be written (another writer holds the fill, the disk fails) the writer keeps
    verifying, so the consumer is still protected.
    """

    def __init__(
        self,
        driver: Driver | None,
        image_id: ImageId,
        info: ImageInfo | None,
        hash_nice: int | None,
    ) -> None:
        # No driver: a ``Verifier``, which never opens a cache copy.
        self._driver = driver
        self._hash_nice = hash_nice
        self.image_id = image_id
        self.info = info
        algo, self.expected_hash = choose_digest(info)
        self.digest: Hash = hashlib.new(algo, usedforsecurity=False)
        self.expected_size = info.size if info is not None else None
        self.received = 0
        self._stack = contextlib.ExitStack()
        self._target: WriteTarget | None = None
        self._hasher: Hasher | None = None
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
        if self._driver is None:
            return False
        try:
            self._target = self._stack.enter_context(self._driver.open_for_write(self.image_id))
        except ImageBeingCached:
            log.info("image %s is being cached by another writer; streaming only", self.image_id)
        except (OSError, ImageCacheError) as exc:
            log.error("cannot start caching image %s: %s; streaming only", self.image_id, exc)
        if self._target is not None:
            # Hashed in its own thread while this one reads and writes; a
            # verify-only fill has nothing to overlap the hash with.
            self._hasher = Hasher(self.digest, self._hash_nice)
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
        hasher.submit(FileSpan(fd, offset, count))
        return count

    def scratch_file(self) -> int:
        """A read-write descriptor of a new unnamed file beside the cache copy (caller closes it).

        For a segmented fill's later segments (fill/segments.py): on the cache
        copy's filesystem, so ``copy_from`` moves its bytes in the kernel, and
        without a name (``O_TMPFILE`` where the kernel has it), so nothing is
        left behind by a crash.
        """
        if self._driver is None or self._target is None:
            raise CacheStoreError(f"the fill of {self.image_id!r} has no cache copy")
        directory = self._driver.layout.incomplete_path(self.image_id).parent
        scratch = tempfile.TemporaryFile(dir=directory, buffering=0)  # noqa: SIM115 - the fd outlives it
        try:
            return os.dup(scratch.fileno())
        finally:
            scratch.close()

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


class Verifier(FillWriter):
    """A writer that stores nothing: ``write`` hashes, ``verify`` checks size and hash.

    For bytes that pass through without a cache copy (a stream-through, the
    rest of a download whose fill died); never opened, so never committed.
    """

    def __init__(self, image_id: ImageId, info: ImageInfo | None) -> None:
        super().__init__(None, image_id, info, None)
