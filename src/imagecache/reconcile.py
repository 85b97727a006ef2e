"""Start-up reconciliation: make metadata and files agree after a crash, while serving.

A crash can leave four kinds of disagreement (the commit's crash states are
drawn in ``drivers/files.py``):

- a metadata row whose file is gone            -> the row is dropped;
- a committed file without a row                -> adopted (size from the file,
  hits 0, ``last_accessed`` = mtime) if it passes a sanity check, else moved
  to ``invalid/``;
- a row whose size is not the file's            -> the row takes the file's size;
- a fill in ``incomplete/`` whose writer is dead -> moved to ``invalid/``.

The sqlite driver already repairs the first three when it is configured; this
pass does them for every driver that records metadata apart from its files
(and finds nothing left to do for sqlite or xattr). It is safe to run while
fills commit and deletions happen: every candidate is re-checked just before it
is changed, and an incomplete file is moved only while we hold its fill lock
and only if it predates this process (``started_at``), so a fill of this
process that has created its file but not yet locked it (a window of
microseconds) is never taken for a dead one. With several workers, a sibling
started earlier could lose such a fill; its commit then fails cleanly (the
file is no longer its own) and the download it served is unaffected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from imagecache.cache import ImageCache
from imagecache.layout import rename_if_exists
from imagecache.records import CachedImage
from imagecache.scrub import recorded_digest

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    dropped: int = 0  # rows without files
    adopted: int = 0  # files without rows
    resized: int = 0  # rows with the wrong size
    rejected: int = 0  # files without rows that failed the sanity check
    stale_fills: int = 0  # dead writers' incomplete files moved to invalid/

    @property
    def changed(self) -> bool:
        return any(dataclasses.astuple(self))


def reconcile(cache: ImageCache, started_at: float | None = None) -> ReconcileReport:
    """Repair the disagreements listed in the module docstring; blocking."""
    report = ReconcileReport()
    _reconcile_metadata(cache, report)
    _retire_dead_fills(cache, time.time() if started_at is None else started_at, report)
    if report.changed:
        log.warning("reconciled %s: %s", cache.driver.layout.base, report)
    return report


def _reconcile_metadata(cache: ImageCache, report: ReconcileReport) -> None:
    layout = cache.driver.layout
    on_disk = {entry.name for entry in layout.iter_images()}
    records = {image.image_id: image for image in cache.get_cached_images()}
    for image_id, record in records.items():
        path = layout.active_path(image_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            # Deletion forgets the row before the file, so a row without a file
            # is never a deletion in progress; it is a crash or a hand edit.
            if cache.delete_cached_image(image_id) or cache.get_cached_image(image_id) is None:
                report.dropped += 1
            continue
        if st.st_size == 0 and recorded_digest(record) is None:
            _reject(cache, image_id, report)
            continue
        if st.st_size != record.size:
            fixed = dataclasses.replace(record, size=st.st_size)
            cache.driver.record_image(fixed, replace=True)
            report.resized += 1
    for image_id in sorted(on_disk - records.keys()):
        if cache.get_cached_image(image_id) is not None:
            continue  # a commit wrote its row while we looked
        path = layout.active_path(image_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        if st.st_size == 0:
            _reject(cache, image_id, report)
            continue
        adopted = CachedImage(
            image_id=image_id,
            size=st.st_size,
            hits=0,
            last_accessed=st.st_mtime,
            last_modified=st.st_mtime,
        )
        try:
            if cache.driver.record_image(adopted):
                report.adopted += 1
        except NotImplementedError:
            log.warning("the %s driver cannot adopt %s; leaving it", cache.driver.name, path)


def _reject(cache: ImageCache, image_id: str, report: ReconcileReport) -> None:
    """Move an empty file nobody vouches for (no recorded hash) to ``invalid/``.

    A fill never commits zero bytes unless the origin promised an empty image,
    and then it records the hash of nothing; an empty file without one is debris.
    """
    layout = cache.driver.layout
    log.warning("moving the empty, unverifiable file %s to invalid/", image_id)
    rename_if_exists(layout.active_path(image_id), layout.invalid_path(image_id))
    cache.delete_cached_image(image_id)
    report.rejected += 1


def _retire_dead_fills(cache: ImageCache, started_at: float, report: ReconcileReport) -> None:
    layout = cache.driver.layout
    for entry in list(layout.iter_images(layout.incomplete_dir)):
        path = Path(entry.path)
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime >= started_at:
                continue  # may be a fill of this process that has not locked yet
            if _move_if_unlocked(path, layout.invalid_path(entry.name)):
                report.stale_fills += 1


def _move_if_unlocked(path: Path, target: Path) -> bool:
    """Move ``path`` to ``target`` if no live writer holds its lock (we hold it meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer: not stale
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return False  # replaced meanwhile
        log.warning("moving the dead fill %s to invalid/", path)
        return rename_if_exists(path, target)
    finally:
        os.close(fd)
