"""This node's rows of the cluster database, kept locally: what a hit reads.

The mirror is the sqlite driver's database (``SqliteDriver``, the same table,
hit batching and recovery from damage), in a hidden file of the cache
directory (``.central.db``; hidden names are never image ids). The central
driver answers every question about this node's own images from it, and
writes it before the cluster database.

Three tables are added beside ``cached_images``:

- ``outbox``: the images whose local row changed since it was last written to
  the cluster database, one row per image (so it is bounded by the number of
  images, however long the database is away). Triggers on ``cached_images``
  fill it in the same transaction as the change, whoever makes it (a commit, a
  hit batch, a pin, reconciliation), so no change can be forgotten, not even
  by a crash. ``version`` grows with every change: a drain removes an entry
  only if its ``version`` is still the one it pushed, so a change made while
  it pushed is pushed again.
- ``unchecked_fills``: images committed while the database was away, with
  the time their fill began; the drain checks them against the cluster's
  deletions ("a deletion during the fill wins") before it publishes them.
- ``identity``: the node id this directory was given by each cluster database
  it joined (keyed by the database URL without its password), so a node can
  start while its database is away.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from sqlalchemy.engine import make_url

from imagecache.drivers.central.schema import to_datetime
from imagecache.drivers.config import DriverConfig
from imagecache.drivers.sqlite import SqliteDriver
from imagecache.records import CachedImage

MIRROR_DB = ".central.db"

_MARK = (
    " INSERT INTO outbox (image_id) VALUES ({row}.image_id)"
    " ON CONFLICT (image_id) DO UPDATE SET version = version + 1;"
)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS outbox ("
    " image_id TEXT PRIMARY KEY, version INTEGER NOT NULL DEFAULT 1)",
    "CREATE TABLE IF NOT EXISTS unchecked_fills (image_id TEXT PRIMARY KEY, started_at REAL)",
    "CREATE TABLE IF NOT EXISTS identity (database TEXT PRIMARY KEY, url TEXT, node_id INTEGER)",
    # An upsert, not INSERT OR REPLACE: a hit batch touches one small row in
    # place (the hit path's flush pays for it, about 20 us with a replace).
    "CREATE TRIGGER IF NOT EXISTS outbox_on_insert AFTER INSERT ON cached_images BEGIN"
    + _MARK.format(row="new")
    + " END",
    "CREATE TRIGGER IF NOT EXISTS outbox_on_update AFTER UPDATE ON cached_images BEGIN"
    + _MARK.format(row="new")
    + " END",
    "CREATE TRIGGER IF NOT EXISTS outbox_on_delete AFTER DELETE ON cached_images BEGIN"
    + _MARK.format(row="old")
    + " END",
)


def database_key(database_url: str) -> str:
    """A stable name of a cluster database that holds no secret (the password is left out)."""
    url = make_url(database_url).render_as_string(hide_password=True)
    return hashlib.sha256(url.encode()).hexdigest()[:32]


class Mirror(SqliteDriver):
    """The local copy of this node's rows, with the outbox of changes not yet written centrally."""

    name = "central"  # its errors are the central driver's
    reconcile_on_open = False  # CentralDriver.configure reconciles, after seeding and imports

    @classmethod
    def over(cls, config: DriverConfig) -> Mirror:
        """The mirror of a central node's cache directory, opened (not yet reconciled)."""
        mirror = cls(dataclasses.replace(config, image_cache_sqlite_db=MIRROR_DB))
        mirror.configure()
        return mirror

    def _migrate(self) -> None:
        super()._migrate()
        with self._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # --- the outbox ------------------------------------------------------------------------

    def pending(self, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` ``(version, image_id)`` of the outbox."""
        rows = self._query("SELECT version, image_id FROM outbox LIMIT ?", (limit,))
        return [(int(version), str(image_id)) for version, image_id in rows]

    def pending_version(self, image_id: str) -> int | None:
        """The version of the image's outbox entry (None: nothing queued)."""
        rows = self._query("SELECT version FROM outbox WHERE image_id = ?", (image_id,))
        return int(rows[0][0]) if rows else None

    def pushed(self, entries: list[tuple[int, str]]) -> None:
        """Drop outbox entries that were written centrally, unless changed since."""
        if not entries:
            return
        with self._tx() as conn:
            conn.executemany("DELETE FROM outbox WHERE image_id = ? AND version = ?", (
                (image_id, version) for version, image_id in entries
            ))  # fmt: skip

    def depth(self) -> int:
        """How many images have changes the cluster database has not seen."""
        return int(self._query("SELECT COUNT(*) FROM outbox")[0][0])

    def mark(self, image_ids: list[str]) -> None:
        """Queue these images for the cluster database (their rows, or their absence)."""
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO outbox (image_id) VALUES (?)"
                " ON CONFLICT (image_id) DO UPDATE SET version = version + 1",
                ((i,) for i in image_ids),
            )

    def rows(self, image_ids: list[str]) -> dict[str, CachedImage]:
        """The local records of these images (an id without a record is absent)."""
        found: dict[str, CachedImage] = {}
        for image_id in image_ids:
            record = self._record(image_id)
            if record is not None:
                found[image_id] = record
        return found

    def _record(self, image_id: str) -> CachedImage | None:
        # Any id the outbox holds, valid or not: reconciliation drops rows naming no valid id.
        rows = self._query(
            "SELECT image_id, size, hits, last_accessed, last_modified, checksum, hash_algo,"
            " hash_value, pinned FROM cached_images WHERE image_id = ?",
            (image_id,),
        )
        if not rows:
            return None
        image_id, size, hits, accessed, modified, checksum, algo, value, pinned = rows[0]
        return CachedImage(
            image_id, size or 0, hits or 0, accessed or 0.0, modified or 0.0, checksum, algo, value,
            pinned == 1,
        )  # fmt: skip

    # --- fills committed while the database was away --------------------------------------

    def note_unchecked(self, image_id: str, started_at: float) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO unchecked_fills (image_id, started_at) VALUES (?, ?)",
                (image_id, started_at),
            )

    def unchecked(self, image_ids: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        for image_id in image_ids:
            rows = self._query(
                "SELECT started_at FROM unchecked_fills WHERE image_id = ?", (image_id,)
            )
            if rows:
                found[image_id] = float(rows[0][0])
        return found

    def checked(self, image_ids: list[str]) -> None:
        with self._tx() as conn:
            conn.executemany(
                "DELETE FROM unchecked_fills WHERE image_id = ?", ((i,) for i in image_ids)
            )

    # --- identity --------------------------------------------------------------------------

    def known_node_id(self, database_url: str, url: str) -> int | None:
        """The node id this directory had in that database under that URL, if it ever joined."""
        rows = self._query(
            "SELECT node_id, url FROM identity WHERE database = ?", (database_key(database_url),)
        )
        if not rows or rows[0][1] != url:
            return None
        return int(rows[0][0])

    def remember_node_id(self, database_url: str, url: str, node_id: int) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO identity (database, url, node_id) VALUES (?, ?, ?)",
                (database_key(database_url), url, node_id),
            )


def image_values(image: CachedImage, node_id: int) -> dict[str, Any]:
    """A central ``cached_images`` row of this node from a local record."""
    return {
        "image_id": image.image_id,
        "node_id": node_id,
        "size": image.size,
        "hits": image.hits,
        "last_accessed": to_datetime(image.last_accessed),
        "last_modified": to_datetime(image.last_modified),
        "checksum": image.checksum,
        "hash_algo": image.hash_algo,
        "hash_value": image.hash_value,
        "pinned": image.pinned,
    }
