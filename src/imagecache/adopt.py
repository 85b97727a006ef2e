"""Adopting an existing Glance cache directory, keeping its hit counts and access times.

Glance keeps committed images as ``<dir>/<image_id>``, with metadata either in
``<dir>/cache.db`` (its sqlite driver: table ``cached_images``) or in extended
attributes (its xattr driver: ``user.hits``, with access times from ``st_atime``).
Adoption moves each image into our cache directory (a rename on the same
filesystem, a copy otherwise) and records it with the driver we are configured
with, whatever Glance used. Queue markers come along too. The Glance directory
is left with whatever could not be adopted, so nothing is ever lost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imagecache.cache import ImageCache
from imagecache.errors import ConfigurationError
from imagecache.layout import CacheLayout, fsync_dir, sqlite_side_files
from imagecache.records import AdoptOutcome, AdoptReport, CachedImage

log = logging.getLogger(__name__)

GLANCE_HITS_XATTR = "user.hits"


def _read_glance_db(db_path: Path) -> dict[str, dict[str, Any]]:
    """Rows of Glance's ``cached_images`` table, read-only (Glance may still hold it)."""
    uri = f"file:{db_path}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot open Glance cache database {db_path}: {exc}") from exc
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT image_id, last_accessed, last_modified, size, hits, checksum FROM cached_images"
        ).fetchall()
    except sqlite3.Error as exc:
        raise ConfigurationError(
            f"{db_path} is not a Glance cache database (no cached_images table): {exc}"
        ) from exc
    finally:
        conn.close()
    return {str(row["image_id"]): dict(row) for row in rows}


def _xattr_hits(path: Path) -> int | None:
    try:
        return int(os.getxattr(path, GLANCE_HITS_XATTR).decode())
    except (OSError, ValueError):
        return None


def _move(src: Path, dst: Path, keep_source: bool) -> None:
    """Rename when we can (same filesystem, instant); copy through a temp file otherwise."""
    if not keep_source:
        try:
            os.rename(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    tmp = dst.parent / "incomplete" / dst.name
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.rename(tmp, dst)
    if not keep_source:
        src.unlink()


def import_glance_cache(
    cache: ImageCache,
    source: Path,
    *,
    keep_source: bool = False,
    progress: Callable[[str, AdoptOutcome], None] | None = None,
) -> AdoptReport:
    """Take over the Glance cache in ``source``; see the module docstring."""
    source = Path(source)
    if not source.is_dir():
        raise ConfigurationError(f"Glance cache directory {source} does not exist")
    layout = cache.layout
    if not cache.can_record:
        raise ConfigurationError(
            f"the {cache.driver_name} driver cannot adopt files; import into a cache "
            "directory using the sqlite or xattr driver"
        )
    if source.resolve() == layout.base.resolve():
        raise ConfigurationError(f"{source} is already the configured cache directory")
    db_path = source / "cache.db"
    rows = _read_glance_db(db_path) if db_path.is_file() else {}
    report = AdoptReport(metadata_source="cache.db" if db_path.is_file() else "xattr")
    glance = CacheLayout(source, reserved=sqlite_side_files("cache.db"))
    for entry in sorted(glance.iter_images(), key=lambda e: e.name):
        image_id = entry.name
        outcome = _adopt_one(cache, Path(entry.path), image_id, rows.get(image_id), keep_source)
        report.outcomes[image_id] = outcome
        if outcome is AdoptOutcome.ADOPTED:
            report.bytes += cache.get_image_size(image_id)
        if progress is not None:
            progress(image_id, outcome)
    fsync_dir(layout.base)
    for entry in glance.iter_images(glance.queue_dir):
        if cache.queue_image(entry.name):
            report.queued += 1
        if not keep_source:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    return report


def _adopt_one(
    cache: ImageCache,
    src: Path,
    image_id: str,
    row: dict[str, Any] | None,
    keep_source: bool,
) -> AdoptOutcome:
    if cache.is_cached(image_id):
        return AdoptOutcome.ALREADY_CACHED
    try:
        st = src.stat()
    except OSError:
        return AdoptOutcome.SKIPPED
    if st.st_size == 0 or (row is not None and int(row["size"] or 0) not in (0, st.st_size)):
        log.warning("not adopting %s: empty, or its size disagrees with cache.db", src)
        return AdoptOutcome.SKIPPED
    if row is not None:
        modified = float(row["last_modified"] or st.st_mtime)
        # Glance writes last_accessed = 0 for images never read.
        accessed = float(row["last_accessed"] or modified)
        hits = int(row["hits"] or 0)
        checksum = row["checksum"] or None
    else:
        modified, accessed = st.st_mtime, max(st.st_atime, st.st_mtime)
        hits = _xattr_hits(src) or 0
        checksum = None
    _move(src, cache.layout.active_path(cache.layout.accept(image_id)), keep_source)
    cache.record_image(
        CachedImage(
            image_id=image_id,
            size=st.st_size,
            hits=hits,
            last_accessed=accessed,
            last_modified=modified,
            checksum=checksum,
        ),
        replace=True,
    )
    return AdoptOutcome.ADOPTED
