"""The part of every driver that lives in the filesystem: fills, queue markers, clean.

Drivers differ only in where metadata lives (a sqlite table, extended
attributes, a central database). Everything the layout decides — what "cached",
"being cached" and "queued" mean, how a fill is committed or rolled back — is
here once, so the three drivers cannot drift apart.

One writer per image: a fill creates ``incomplete/<id>`` with ``O_EXCL`` and
holds ``flock(LOCK_EX)`` on it until it has committed or rolled back. The kernel
drops the lock when a writer dies, so a lock that can be taken on an existing
incomplete file means its writer is gone and the file may be taken over.

Crash states. A commit is: fsync the file, rename ``incomplete/<id>`` to
``<id>``, fsync the directory, record metadata, remove the queue marker. A
process killed at any point leaves one of these, and none of them ever shows a
half-written file at ``<dir>/<id>`` (tests/test_crash.py kills real writers):

1. Killed while writing, before the rename: ``incomplete/<id>`` with no lock
   holder. ``is_being_cached`` is True until ``clean`` removes it (it is
   stalled once older than the stall time; ``clean(0)`` takes it at once) or
   the next ``open_for_write`` takes it over: removes it and starts a new file.
2. Killed after the rename, before the metadata: ``<id>`` is complete and
   verified but has no record. The xattr driver lists it anyway (its
   attributes fall back to the file's times, zero hits); the sqlite and central
   drivers adopt it when next configured (``reconcile.reconcile_records``), so
   after a restart ``is_cached`` and ``get_cached_images`` agree.
3. Killed after the metadata, before the queue marker goes: the image is
   cached and still queued; the prefetcher finds it cached and drops the marker.

Deletion removes metadata first and the file after, so a crash in between
leaves state 2 again, which the same reconciliation adopts.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from imagecache.drivers.base import Driver
from imagecache.drivers.hooks import NO_COMMIT_HOOKS, CommitHooks
from imagecache.errors import CacheStoreError, ImageBeingCached, ImageNotCached
from imagecache.fill.locks import locked_by_writer, take_if_unlocked
from imagecache.layout import ImageId, fsync_dir, rename_if_exists, unlink_if_exists
from imagecache.records import Chunk, CleanResult, QueueResult

log = logging.getLogger(__name__)

# Cache files are not for everyone on the host (Glance's LP #1031796).
FILE_MODE = 0o640
# A fill makes what it has written durable in the background every this many
# bytes, so the fsync at commit has little left to do (see _Flusher).
FLUSH_STEP = 32 * 1024 * 1024
# With fill_drop_behind, the page cache of a fill is dropped this far behind
# what has been made durable: readers of the growing file (the fill's clients,
# followers) run close behind the writer and still find their bytes in memory.
DROP_BEHIND_LAG = 4 * FLUSH_STEP


def drop_pages(fd: int, start: int, end: int) -> None:
    """Drop the clean pages of bytes ``[start, end)`` of ``fd`` from the page cache.

    Advice only: a fill is no worse for its failing, so a failure is logged at debug.
    """
    try:
        os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError as exc:
        log.debug("dropping written pages of a fill failed: %s", exc)


class _Flusher:
    """``fdatasync`` of a growing file in a thread of its own, while the fill goes on.

    On these VMs the commit's fsync cost 0.3-0.5 s per 512 MiB even when
    ``sync_file_range`` had already written every page back: the time goes to
    the device flushing its own write cache, which only an fsync asks for.
    Flushing in step with the fill overlaps that with the copy and leaves the
    commit ~10 ms (docs/benchmarks-log.md, "Miss path work").

    With ``drop_behind`` each flush is followed by dropping the clean pages
    more than ``DROP_BEHIND_LAG`` behind it from the page cache (see the
    setting ``fill_drop_behind``).

    An error is kept for the commit to raise: the kernel reports a writeback
    error to one fsync per descriptor, and it may be this thread's.
    """

    def __init__(self, fd: int, drop_behind: bool) -> None:
        self.fd = fd
        self.error: OSError | None = None
        self._drop_behind = drop_behind
        # Bytes of the file written when the last flush was asked for; pages
        # below _dropped_to are already out of the page cache.
        self._upto = 0
        self._dropped_to = 0
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="imagecache-flush", daemon=True)
        self._thread.start()

    def request(self, upto: int) -> None:
        self._upto = upto
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            upto = self._upto  # read before the flush: only what it covers is clean
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                self.error = exc
                return
            if self._drop_behind:
                self._drop(upto - DROP_BEHIND_LAG)

    def _drop(self, end: int) -> None:
        if end > self._dropped_to:
            drop_pages(self.fd, self._dropped_to, end)
            self._dropped_to = end

    def close(self) -> None:
        """Stop; returns once no ``fdatasync`` of ours runs on the descriptor."""
        self._closing = True
        self._wanted.set()
        self._thread.join()


class Fill:
    """An open ``incomplete/<id>`` held under an exclusive lock: one writer of one image."""

    def __init__(
        self, image_id: ImageId, path: Path, fd: int, *, drop_behind: bool = False
    ) -> None:
        self.image_id = image_id
        self.path = path
        self.fd = fd
        self.drop_behind = drop_behind
        self.inode = os.fstat(fd).st_ino
        # When the fill began: a deletion recorded after it wins over its commit
        # (the central driver refuses such a commit; see CentralDriver._meta_commit).
        self.started_at = time.time()
        self.bytes_written = 0
        self._flushed_at = 0
        self._flusher: _Flusher | None = None
        # Set by the caller before commit; recorded with the entry.
        self.checksum: str | None = None
        self.hash_algo: str | None = None
        self.hash_value: str | None = None

    def write(self, data: Chunk, /) -> int:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.wrote(len(data))
        return len(data)

    def wrote(self, count: int, /) -> None:
        """Account ``count`` bytes put at the file's position by other means (a kernel copy)."""
        self.bytes_written += count
        if self.bytes_written - self._flushed_at >= FLUSH_STEP:
            self._flushed_at = self.bytes_written
            if self._flusher is None:
                self._flusher = _Flusher(self.fd, self.drop_behind)
            self._flusher.request(self.bytes_written)

    def sync(self) -> None:
        """Make the whole file durable (the commit's fsync); raises a background flush's error.

        With ``drop_behind`` the file then keeps only its last
        ``DROP_BEHIND_LAG`` bytes in the page cache, whatever the background
        flushes got to: every page is clean now.
        """
        self.stop_flushing()
        os.fsync(self.fd)
        if self.drop_behind and self.bytes_written > DROP_BEHIND_LAG:
            drop_pages(self.fd, 0, self.bytes_written - DROP_BEHIND_LAG)

    def stop_flushing(self) -> None:
        """End the background flushes; raises the error one of them met."""
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            flusher.close()
            if flusher.error is not None:
                raise flusher.error

    def fileno(self) -> int:
        return self.fd

    def still_ours(self) -> bool:
        """The incomplete path still names the inode this fill is writing."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except FileNotFoundError:
            return False


def writer_alive(path: Path) -> bool:
    """Whether a live process holds the fill lock on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return locked_by_writer(fd)
    finally:
        os.close(fd)


class FileBackedDriver(Driver):
    """Filesystem semantics shared by every driver; metadata is left to subclasses."""

    # Where tests hold or stop a commit (drivers/hooks.py); no-ops in production.
    commit_hooks: CommitHooks = NO_COMMIT_HOOKS

    # --- metadata hooks ---------------------------------------------------------------------

    @abc.abstractmethod
    def _meta_commit(self, fill: Fill, size: int, now: float) -> None:
        """Record a newly committed image (``last_accessed = now``)."""

    @abc.abstractmethod
    def _meta_forget(self, image_ids: Iterable[str]) -> None:
        """Drop the metadata of these images (files are removed afterwards)."""

    def _meta_rollback(self, fill: Fill, reason: str) -> None:
        """Note why a fill failed, before its file moves to ``invalid/``."""

    # --- state ---------------------------------------------------------------------------

    def is_cached(self, image_id: str) -> bool:
        return self.layout.active_path(self.layout.accept(image_id)).is_file()

    def is_being_cached(self, image_id: str) -> bool:
        return self.layout.incomplete_path(self.layout.accept(image_id)).exists()

    def is_cacheable(self, image_id: str) -> bool:
        checked = self.layout.accept(image_id)
        return not (self.is_cached(checked) or self.is_being_cached(checked))

    def is_queued(self, image_id: str) -> bool:
        return self.layout.queue_path(self.layout.accept(image_id)).exists()

    # --- queue --------------------------------------------------------------------------------

    def queue_image(self, image_id: str) -> QueueResult:
        checked = self.layout.accept(image_id)
        if self.is_cached(checked):
            return QueueResult.ALREADY_CACHED
        if self.is_being_cached(checked):
            return QueueResult.BEING_CACHED
        path = self.layout.queue_path(checked)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except FileExistsError:
            return QueueResult.ALREADY_QUEUED
        os.close(fd)
        # The filesystem's own timestamps are coarse (ext4 ticks in milliseconds),
        # so markers made in one burst could tie; stamp a fine one explicitly.
        now = time.time_ns()
        os.utime(path, ns=(now, now))
        return QueueResult.QUEUED

    def get_queued_images(self) -> list[str]:
        found: list[tuple[int, str]] = []
        for entry in self.layout.iter_images(self.layout.queue_dir):
            try:
                found.append((entry.stat().st_mtime_ns, entry.name))
            except FileNotFoundError:  # a prefetcher removed it while we looked
                continue
        return [name for _, name in sorted(found)]

    def delete_queued_image(self, image_id: str) -> bool:
        return unlink_if_exists(self.layout.queue_path(self.layout.accept(image_id)))

    def delete_all_queued_images(self) -> int:
        return sum(
            unlink_if_exists(Path(entry.path))
            for entry in list(self.layout.iter_images(self.layout.queue_dir))
        )

    # --- deletion -------------------------------------------------------------------------------

    def delete_cached_image(self, image_id: str) -> bool:
        path = self.layout.active_path(self.layout.accept(image_id))
        with _committed(path):
            # Metadata first: a crash in between leaves a file without a row, which
            # reconciliation adopts or removes, never a row pointing at nothing.
            self._meta_forget([image_id])
            return unlink_if_exists(path)

    def cancel_fill(self, image_id: str) -> bool:
        """Make a fill in progress (of any process) end uncommitted; True if there was one.

        Its file moves to ``invalid/``. The writer keeps its descriptor and
        lock and writes on, so the clients reading that file still get every
        byte, but its commit finds the incomplete path no longer its own
        (``Fill.still_ours``) and rolls back: a deletion made during a fill
        wins over it. A commit already past that check has renamed its file
        into place and holds the lock until its record is written; a
        ``delete_cached_image`` after this call waits for that and removes it.
        """
        checked = self.layout.accept(image_id)
        path = self.layout.incomplete_path(checked)
        cancelled = rename_if_exists(path, self.layout.invalid_path(checked))
        if cancelled:
            log.info("cancelled the fill of %s: the image was deleted", image_id)
        return cancelled

    def forget_records(self, image_ids: Iterable[str]) -> None:
        """Drop the metadata of these images and leave any file alone.

        For reconciliation (``reconcile.py``), which drops rows whose file is
        gone, including rows naming no valid id (an adopted Glance database may
        hold anything) that ``delete_cached_image`` refuses.
        """
        self._meta_forget(image_ids)

    def delete_all_cached_images(self) -> int:
        # One batch, for speed with many entries; unlike delete_cached_image it
        # does not wait for commits in progress (an entry committed in the same
        # milliseconds may survive the clear, or leave a record that start-up
        # reconciliation drops).
        entries = list(self.layout.iter_images())
        self._meta_forget(entry.name for entry in entries)
        return sum(unlink_if_exists(Path(entry.path)) for entry in entries)

    def clean(self, stall_time: int | None = None) -> CleanResult:
        """Delete ``invalid/`` and stalled fills.

        ``stall_time`` defaults to ``image_cache_stall_time``; 0 means every
        incomplete file. Unlike Glance, a fill whose writer is still alive (it
        holds the lock) is never deleted, whatever its age: it is not stalled.
        """
        if stall_time is None:
            stall_time = self.config.image_cache_stall_time
        invalid = sum(
            unlink_if_exists(Path(entry.path))
            for entry in list(self.layout.iter_images(self.layout.invalid_dir))
        )
        older_than = time.time() - stall_time
        stalled = 0
        for entry in list(self.layout.iter_images(self.layout.incomplete_dir)):
            path = Path(entry.path)
            try:
                if stall_time and entry.stat().st_mtime >= older_than:
                    continue
                if writer_alive(path):
                    continue
                stalled += unlink_if_exists(path)
            except OSError as exc:
                log.warning("could not remove stalled fill %s: %s", path, exc)
        return CleanResult(invalid=invalid, stalled=stalled)

    # --- writing --------------------------------------------------------------------------------

    def _begin_fill(self, image_id: ImageId) -> Fill:
        path = self.layout.incomplete_path(image_id)
        for _ in range(8):  # a few rounds of losing races, then give up loudly
            try:
                # Read as well as write: the hash of a kernel-copied chunk reads
                # it back through a mapping of this descriptor.
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            except FileExistsError:
                existing = _open_existing(path)
                if existing is None:
                    continue  # vanished between our two opens: try to create again
                fd, took_over = existing, True
            else:
                took_over = False
            if not take_if_unlocked(fd):
                os.close(fd)
                raise ImageBeingCached(image_id)
            fill = Fill(image_id, path, fd, drop_behind=self.config.fill_drop_behind)
            if not fill.still_ours():  # committed, rolled back or cleaned meanwhile
                os.close(fd)
                continue
            if not took_over and self.layout.active_path(image_id).exists():
                # Another writer renamed its fill into place after our caller
                # looked: the image is cached, a second fill would read the
                # origin again for nothing.
                unlink_if_exists(path)
                os.close(fd)
                raise ImageBeingCached(image_id)
            if took_over:
                # A new file, not the old one truncated: readers of the dead
                # writer's file (followers in other processes) keep exactly
                # the bytes they were sent, which they hash to finish their
                # downloads from the origin. Unlinked while we hold its lock,
                # then closed, which wakes those readers.
                log.warning("taking over the stalled fill of %s (its writer is gone)", image_id)
                unlink_if_exists(path)
                os.close(fd)
                continue
            return fill
        raise ImageBeingCached(image_id)

    def _commit(self, fill: Fill) -> None:
        fill.sync()
        size = os.fstat(fill.fd).st_size
        active = self.layout.active_path(fill.image_id)
        if not fill.still_ours():
            raise CacheStoreError(
                f"fill of {fill.image_id!r} was removed while being written"
                " (the image was deleted, or its fill cleaned); not kept"
            )
        try:
            os.rename(fill.path, active)
        except FileNotFoundError:
            # Cancelled (cancel_fill) between the check and the rename.
            raise CacheStoreError(
                f"fill of {fill.image_id!r} was removed while being committed; not kept"
            ) from None
        try:
            fsync_dir(self.layout.base)
            self.commit_hooks.renamed(fill.image_id)
            self._meta_commit(fill, size, time.time())
        except BaseException as exc:
            # Never a committed-looking file the metadata does not know: it
            # would be adopted without a hash and served without an ETag. Out
            # of descriptors (the directory fsync opens one) this still works:
            # a rename needs none.
            self._unpublish(fill, active, exc)
            raise
        unlink_if_exists(self.layout.queue_path(fill.image_id))

    def _unpublish(self, fill: Fill, active: Path, exc: BaseException) -> None:
        """Move a file renamed into place, whose commit then failed, to ``invalid/``."""
        try:
            if os.stat(active).st_ino != fill.inode:
                return  # another writer's commit has replaced it: that one is theirs
            os.rename(active, self.layout.invalid_path(fill.image_id))
        except FileNotFoundError:
            return
        except OSError as error:
            log.error("could not move the failed commit of %s away: %s", fill.image_id, error)
            return
        log.warning("fill of %s rolled back to invalid/: commit failed: %r", fill.image_id, exc)

    def _rollback(self, fill: Fill, reason: str) -> None:
        if not fill.still_ours():
            # Moved away already: by _unpublish, or by reconciliation or clean.
            log.warning("fill of %s failed: %s", fill.image_id, reason)
            return
        try:
            self._meta_rollback(fill, reason)
        except Exception:
            log.exception("could not record why the fill of %s failed", fill.image_id)
        try:
            rename_if_exists(fill.path, self.layout.invalid_path(fill.image_id))
        except OSError as exc:
            # A read-only disk: the file stays in incomplete/, unlocked once we
            # close it, so clean or the next fill takes it over. Never served.
            log.error(
                "fill of %s failed (%s) and could not be moved to invalid/: %s; it stays in"
                " incomplete/ until clean or the next fill of the image takes it over",
                fill.image_id,
                reason,
                exc,
            )
            return
        log.warning("fill of %s rolled back to invalid/: %s", fill.image_id, reason)

    @contextlib.contextmanager
    def open_for_write(self, image_id: str) -> Iterator[Fill]:
        fill = self._begin_fill(self.layout.accept(image_id))
        try:
            try:
                yield fill
            except BaseException as exc:
                # Includes GeneratorExit: a consumer that stopped early.
                self._rollback(fill, repr(exc) or type(exc).__name__)
                raise
            try:
                self._commit(fill)
            except BaseException as exc:
                self._rollback(fill, f"commit failed: {exc!r}")
                raise
        finally:
            with contextlib.suppress(OSError):
                fill.stop_flushing()  # before the descriptor goes; a rollback ignores its error
            os.close(fill.fd)  # releases the lock, only now that the outcome is on disk

    # --- reading ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def open_for_read(self, image_id: str) -> Iterator[BinaryIO]:
        handle = self.layout.open_committed(self.layout.accept(image_id))  # never through a symlink
        if handle is None:
            raise ImageNotCached(image_id)
        with handle:
            yield handle
        self.record_hit(image_id)


@contextlib.contextmanager
def _committed(path: Path) -> Iterator[None]:
    """Hold the lock of the committed file at ``path`` (if any) for the block.

    A writer renames its file into place and keeps its lock until the
    entry's metadata is recorded; deleting in between would forget a record
    not yet written, which then appears for a file that is gone. Waiting on
    the lock orders the deletion after the commit (a few milliseconds).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_existing(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
