"""Reconciliation: make metadata and files agree after a crash, while serving.

A crash can leave four kinds of disagreement (the commit's crash states are
drawn in ``drivers/files.py``):

- a metadata row whose file is gone            -> the row is dropped;
- a committed file without a row                -> adopted (size from the file,
  hits 0, ``last_accessed`` = mtime) if it passes a sanity check, else moved
  to ``invalid/``;
- a row whose size is not the file's            -> the row takes the file's size,
  unless the row records a hash: then the file cannot be the bytes that were
  verified (cut short, or grown), and it is quarantined to ``invalid/`` with
  its row dropped, as the hit path does (a hit would serve it whole-looking);
- a fill in ``incomplete/`` whose writer is dead -> moved to ``invalid/``.

``reconcile_records`` repairs the first three, without the sanity check; the
sqlite and central drivers run it when they are configured, so a restarted
process lists what its directory holds before it serves. ``reconcile``, run by
the service in the background, does all four for every driver (the records
part finds nothing left after a driver's own pass, and never anything for
xattr, whose metadata lives on the files). It is safe to run while
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
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from imagecache.drivers.base import Driver
from imagecache.drivers.files import FileBackedDriver
from imagecache.fill.hashing import strongest_hash
from imagecache.fill.locks import take_if_unlocked
from imagecache.layout import CacheLayout, rename_if_exists
from imagecache.records import CachedImage

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    dropped: int = 0  # rows without files
    adopted: int = 0  # files without rows
    resized: int = 0  # rows with the wrong size
    quarantined: int = 0  # verified entries whose file has another size now
    rejected: int = 0  # files without rows that failed the sanity check
    stale_fills: int = 0  # dead writers' incomplete files moved to invalid/

    @property
    def changed(self) -> bool:
        return any(dataclasses.astuple(self))


def reconcile(driver: Driver, started_at: float | None = None) -> ReconcileReport:
    """Repair the disagreements listed in the module docstring; blocking.

    Takes the driver, not the ``ImageCache``: the drivers import this module,
    so it must not depend on the facade above them (that was an import cycle,
    cache -> drivers -> reconcile -> scrub -> cache).
    """
    report = ReconcileReport()
    on_disk = _committed_sizes(driver.layout)
    _reject_empty_files(driver, on_disk, report)
    if isinstance(driver, FileBackedDriver):  # every driver we ship: they can forget a row alone
        _repair_records(driver, on_disk, report)
    _retire_dead_fills(driver.layout, time.time() if started_at is None else started_at, report)
    if report.changed:
        log.warning("reconciled %s: %s", driver.layout.base, report)
    return report


def _vouched(record: CachedImage) -> bool:
    """Whether a record carries a hash that vouches for its file's bytes."""
    return strongest_hash(record.checksum, record.hash_algo, record.hash_value) is not None


def reconcile_records(driver: FileBackedDriver) -> ReconcileReport:
    """Make the driver's records agree with its committed files; blocking.

    The drivers that keep records apart from their files run this when they are
    configured. An empty file is adopted here like any other; the next
    ``reconcile`` moves it to ``invalid/`` unless its record vouches for it.
    """
    report = ReconcileReport()
    _repair_records(driver, _committed_sizes(driver.layout), report)
    if report.changed:
        log.warning(
            "reconciled the %s records of %s with its files: %s",
            driver.name,
            driver.layout.base,
            report,
        )
    return report


def _committed_sizes(layout: CacheLayout) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for entry in layout.iter_images():
        with contextlib.suppress(FileNotFoundError):
            sizes[entry.name] = entry.stat().st_size
    return sizes


def _committed_stat(layout: CacheLayout, image_id: str) -> os.stat_result | None:
    # A row naming no valid id (an adopted Glance database may hold anything)
    # can never be served: it is treated like a row whose file is gone.
    checked = layout.valid(image_id)
    if checked is None:
        return None
    try:
        return os.stat(layout.active_path(checked))
    except FileNotFoundError:
        return None


def _repair_records(
    driver: FileBackedDriver, on_disk: dict[str, int], report: ReconcileReport
) -> None:
    layout = driver.layout
    recorded = dict(driver.iter_sizes())
    suspects = [i for i, size in on_disk.items() if size != recorded.get(i)]
    suspects += [i for i in recorded if i not in on_disk]
    # Deletion forgets the row before the file, so a row without a file is
    # never a deletion in progress; it is a crash or a hand edit.
    gone = [i for i in suspects if i in recorded and _committed_stat(layout, i) is None]
    if gone:
        driver.forget_records(gone)
        report.dropped += len(gone)
    for image_id in suspects:
        st = _committed_stat(layout, image_id)
        if st is None:
            continue
        record = driver.get_cached_image(image_id)  # a commit may have written it meanwhile
        if record is not None:
            if record.size != st.st_size and _vouched(record):
                log.error(
                    "image %s is damaged in the cache: its file has %d bytes, its record %d;"
                    " moved to invalid/",
                    image_id,
                    st.st_size,
                    record.size,
                )
                checked = layout.accept(image_id)  # a name found on disk: not checked yet
                rename_if_exists(layout.active_path(checked), layout.invalid_path(checked))
                driver.forget_records([image_id])
                report.quarantined += 1
            elif record.size != st.st_size:
                driver.record_image(dataclasses.replace(record, size=st.st_size), replace=True)
                report.resized += 1
            continue
        # Its bytes were verified before the rename; only its hash is unknown.
        adopted = CachedImage(
            image_id=image_id,
            size=st.st_size,
            hits=0,
            last_accessed=st.st_mtime,
            last_modified=st.st_mtime,
        )
        try:
            if driver.record_image(adopted):
                report.adopted += 1
        except NotImplementedError:
            log.warning("the %s driver cannot adopt %s; leaving it", driver.name, image_id)


def _reject_empty_files(driver: Driver, on_disk: dict[str, int], report: ReconcileReport) -> None:
    """Move empty files nobody vouches for (no recorded hash) to ``invalid/``.

    A fill never commits zero bytes unless the origin promised an empty image,
    and then it records the hash of nothing; an empty file without one is debris.
    """
    layout = driver.layout
    for image_id in sorted(i for i, size in on_disk.items() if size == 0):
        st = _committed_stat(layout, image_id)
        if st is None or st.st_size:
            continue  # deleted, or committed anew, since the scan
        record = driver.get_cached_image(image_id)
        if record is not None and _vouched(record):
            continue
        log.warning("moving the empty, unverifiable file %s to invalid/", image_id)
        checked = layout.accept(image_id)
        rename_if_exists(layout.active_path(checked), layout.invalid_path(checked))
        driver.delete_cached_image(image_id)
        report.rejected += 1


def _retire_dead_fills(layout: CacheLayout, started_at: float, report: ReconcileReport) -> None:
    for entry in list(layout.iter_images(layout.incomplete_dir)):
        path = Path(entry.path)
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime >= started_at:
                continue  # may be a fill of this process that has not locked yet
            if _move_if_unlocked(path, layout.invalid_path(layout.accept(entry.name))):
                report.stale_fills += 1


def _move_if_unlocked(path: Path, target: Path) -> bool:
    """Move ``path`` to ``target`` if no live writer holds its lock (we hold it meanwhile)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not take_if_unlocked(fd):
            return False  # a live writer: not stale
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            return False  # replaced meanwhile
        log.warning("moving the dead fill %s to invalid/", path)
        return rename_if_exists(path, target)
    finally:
        os.close(fd)
