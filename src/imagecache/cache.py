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

The synchronous API (``get_caching_iter``, ``cache_image_iter``,
``cache_image_file``) is Glance's seed contract: the caller feeds the chunks,
there is no upstream and no event loop, so it does not go through the fill
coordinator (fill/coordinator.py), which reads an upstream. It stays a thin
synchronous tee over ``fill.writer.FillWriter``, so the rules of writing,
verifying and committing a fill live in one place for every miss path.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Generator, Iterable, Iterator
from typing import IO, TYPE_CHECKING, BinaryIO, cast

from imagecache.drivers import create_driver
from imagecache.drivers.base import Driver
from imagecache.drivers.files import FileBackedDriver
from imagecache.fill.hashing import usable_nice
from imagecache.fill.writer import CHUNK_SIZE, FillWriter
from imagecache.layout import CacheLayout, ImageId, rename_if_exists
from imagecache.reconcile import ReconcileReport, reconcile
from imagecache.records import (
    CachedImage,
    CleanResult,
    ImageInfo,
    PruneResult,
    QueueResult,
)
from imagecache.settings import Settings

if TYPE_CHECKING:
    # Only a type: the central driver pulls in SQLAlchemy and alembic, about 0.4 s
    # of a service's start (docs/benchmarks-log.md), which a node of the sqlite or
    # xattr driver never uses.
    from imagecache.drivers.central import CentralDriver

log = logging.getLogger(__name__)


class ImageCache:
    """The image cache of one directory, over the driver the settings name."""

    def __init__(self, settings: Settings, driver: Driver | None = None) -> None:
        self.driver = driver if driver is not None else create_driver(settings)
        # The directory's limits, copied once: the capacity check, prune and the
        # stats read these values. The settings themselves are not kept, so no
        # helper re-reads them through the cache (each is handed its values).
        self.max_size = settings.image_cache_max_size
        self.free_space_watermark = settings.free_space_watermark
        # Above this size an image is only streamed (``too_large``).
        self.largest_cacheable_image = settings.largest_cacheable_image
        # The nice value for fills' hash threads, if this process may use it.
        self.hash_nice = usable_nice(settings.fill_hash_nice)

    def close(self) -> None:
        self.driver.close()

    def __enter__(self) -> ImageCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _id(self, image_id: str) -> ImageId:
        # A caller's str is checked here, once, before any driver sees it; an
        # ImageId (from an edge, or from cache code) passes as is, and the
        # driver's own ``accept`` does not check it again either.
        return self.driver.layout.accept(image_id)

    # --- the directory and the driver behind it -------------------------------------------------
    # The one door to the driver (docs/architecture.md): callers outside cache.py
    # and drivers/ ask here, never through ``cache.driver`` (tests/test_architecture.py).

    @property
    def layout(self) -> CacheLayout:
        """The cache directory: its paths, its image-id rule, its committed files."""
        return self.driver.layout

    @property
    def driver_name(self) -> str:
        """The driver's name (``sqlite``, ``xattr``, ``central``), for messages."""
        return self.driver.name

    @property
    def central(self) -> CentralDriver | None:
        """The driver if it is the cluster's (central) one, else None."""
        # A central driver can exist only once create_driver has imported its
        # module: looked up there, so that asking never imports it.
        module = sys.modules.get("imagecache.drivers.central")
        if module is None or not isinstance(self.driver, module.CentralDriver):
            return None
        return cast("CentralDriver", self.driver)

    @property
    def can_record(self) -> bool:
        """Whether the driver can record a committed file it did not fill (adopt, scrub)."""
        return type(self.driver).record_image is not Driver.record_image

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

    def record_hit(self, image_id: str) -> None:
        """Count a hit of a cached image (drivers batch them; none waits for a database)."""
        self.driver.record_hit(self._id(image_id))

    def get_cached_images(self) -> list[CachedImage]:
        return self.driver.get_cached_images()

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        return self.driver.get_cached_image(self._id(image_id))

    def iter_lru(self) -> Iterator[tuple[str, int]]:
        """Unpinned committed images with their sizes, least recently accessed first."""
        return self.driver.iter_lru()

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

    def record_image(self, image: CachedImage, *, replace: bool = False) -> bool:
        """Record a committed file the cache did not fill; see ``Driver.record_image``."""
        return self.driver.record_image(image, replace=replace)

    def reconcile(self, started_at: float | None = None) -> ReconcileReport:
        """Make the records and the files agree (``reconcile.py``)."""
        return reconcile(self.driver, started_at)

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
        image_id = self._id(image_id)
        active = layout.active_path(image_id)
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
        limit = self.max_size if max_size is None else max_size
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
        return FillWriter(self.driver, self._id(image_id), info, self.hash_nice)

    def should_cache(self, image_id: str, info: ImageInfo | None) -> bool:
        """Whether a fill of this image should write a cache copy at all.

        An incomplete file does not answer "no": its writer may be dead, and
        only ``open_for_write`` can tell (it takes a stale fill over and raises
        ``ImageBeingCached`` for a live one, which the caller streams through).
        """
        if self.driver.is_cached(self._id(image_id)):
            return False
        size = info.size if info is not None else None
        if self.too_large(size):
            log.info(
                "image %s (%d bytes) is above the largest cacheable size (%d); streaming only",
                image_id,
                size,
                self.largest_cacheable_image,
            )
            return False
        return True

    def too_large(self, size: int | None) -> bool:
        """Whether an image of ``size`` bytes is never cached, only streamed (unknown: no).

        The one copy of the rule: the facade's ``should_cache``, the fill
        coordinator and the capacity check all ask here.
        """
        return size is not None and size > self.largest_cacheable_image

    def get_caching_iter(
        self, image_id: str, chunks: Iterable[bytes], info: ImageInfo | None = None
    ) -> Generator[bytes, None, None]:
        """Yield ``chunks`` while teeing them into the cache; verify before the last one."""
        image_id = self._id(image_id)
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
        image_id = self._id(image_id)
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
