"""Importing a single-node ``cache.db`` (Glance's or ours) into the cluster's rows."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imagecache.drivers.central.schema import CentralStore
from imagecache.errors import CacheStoreError
from imagecache.records import CachedImage

if TYPE_CHECKING:
    from imagecache.drivers.central.mirror import Mirror


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What ``import_sqlite_cache`` did with the rows of a single-node ``cache.db``."""

    imported: int
    already_present: int
    missing_file: int


class SqliteImport(CentralStore):
    """The importer of a node that was a single-node (sqlite driver) cache before."""

    mirror: Mirror

    def import_sqlite_cache(self, db_path: Path | None = None) -> ImportResult:
        """Copy the rows of a single-node ``cache.db`` (Glance's or ours) into this node's rows.

        Hits, access and modification times, digests and pins are kept. A row
        whose file is not in this cache directory is skipped (it describes
        nothing), and so is a row this node already has (in its mirror of its
        cluster rows: that one is newer). Idempotent: configure() runs it at every start while the
        file is there. The sqlite file is only read, never changed.
        """
        path = db_path or self.layout.base / self.config.image_cache_sqlite_db
        try:
            legacy = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                present = {row[1] for row in legacy.execute("PRAGMA table_info(cached_images)")}
                wanted = ["image_id", "last_accessed", "last_modified", "size", "hits", "checksum"]
                wanted += [c for c in ("hash_algo", "hash_value", "pinned") if c in present]
                rows = legacy.execute(
                    f"SELECT {', '.join(wanted)} FROM cached_images"  # noqa: S608 - fixed names
                ).fetchall()
            finally:
                legacy.close()
        except sqlite3.Error as exc:
            raise CacheStoreError(f"cannot read the sqlite cache {path}: {exc}") from exc
        known = {image_id for image_id, _ in self.mirror.iter_sizes()}
        fresh: list[CachedImage] = []
        already = missing = 0
        for row in rows:
            entry = dict(zip(wanted, row, strict=True))
            image_id = entry["image_id"]
            if image_id in known:
                already += 1
                continue
            if not self.layout.is_valid(image_id) or not self.is_cached(image_id):
                missing += 1
                continue
            stat = self.layout.active_path(image_id).stat()
            modified = float(entry["last_modified"] or 0.0) or stat.st_mtime
            accessed = float(entry["last_accessed"] or 0.0) or modified
            fresh.append(
                CachedImage(
                    image_id=image_id,
                    size=stat.st_size,
                    hits=int(entry["hits"] or 0),
                    last_accessed=accessed,
                    last_modified=modified,
                    checksum=entry["checksum"],
                    hash_algo=entry.get("hash_algo"),
                    hash_value=entry.get("hash_value"),
                    pinned=bool(entry.get("pinned") or False),
                )
            )
        for image in fresh:
            # Racing another worker of this node importing the same file: keep theirs.
            self.mirror.record_image(image)
        self.push([image.image_id for image in fresh])
        return ImportResult(imported=len(fresh), already_present=already, missing_file=missing)
