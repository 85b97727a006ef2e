"""The embedded default driver: metadata in ``<dir>/cache.db`` with stdlib sqlite3.

Glance's sqlite driver opens a connection per operation in rollback-journal
mode, retries "database is locked" by hand and swallows database errors; here it
manages ~300 recorded hits per second. This driver keeps one connection per
thread in WAL mode, lets sqlite's busy handler wait for writers, and lets every
error surface as ``CacheStoreError``: tens of thousands of hits per second (see
docs/benchmarks-log.md).

The table is Glance's ``cached_images`` with columns added, so a Glance
``cache.db`` is upgraded in place on first open; ``PRAGMA user_version`` holds
our schema version.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from imagecache.drivers.files import FileBackedDriver, Fill
from imagecache.errors import BadDriverConfiguration, CacheStoreError
from imagecache.reconcile import reconcile_records
from imagecache.records import CachedImage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2

# Hits are counted in memory and written in one transaction per batch: a commit
# per hit tops out near 15,000/s here (each commit appends to the WAL and every
# few hundred trigger a checkpoint with fsync), while a batch costs about the
# same as one hit. A batch is written when it reaches HIT_BATCH hits, HIT_DELAY
# seconds after its first hit, before any metadata query or change of this
# driver, and on close. The price: another process sees a hit up to HIT_DELAY
# late, and a crash loses at most one batch of hits (never an image).
HIT_BATCH = 256
HIT_DELAY = 0.2

# Version 1 is Glance's table exactly (user_version 0 in a Glance cache.db).
_GLANCE_TABLE = """
CREATE TABLE IF NOT EXISTS cached_images (
    image_id TEXT PRIMARY KEY,
    last_accessed REAL DEFAULT 0.0,
    last_modified REAL DEFAULT 0.0,
    size INTEGER DEFAULT 0,
    hits INTEGER DEFAULT 0,
    checksum TEXT
)
"""
# Version 2 adds what Glance does not keep.
_COLUMNS_OF_2 = {
    "hash_algo": "TEXT",
    "hash_value": "TEXT",
    "pinned": "INTEGER NOT NULL DEFAULT 0",
}
_LRU_INDEX = (
    "CREATE INDEX IF NOT EXISTS ix_cached_images_lru ON cached_images (pinned, last_accessed)"
)
_COLUMNS = (
    "image_id, size, hits, last_accessed, last_modified, checksum, hash_algo, hash_value, pinned"
)


def _row_to_image(row: tuple[Any, ...]) -> CachedImage:
    # The columns' affinity already hands back int and float; only NULLs (rows
    # from an adopted Glance database) need a default. Listing 100k entries
    # spends most of its time here, so no conversion runs that is not needed.
    image_id, size, hits, accessed, modified, checksum, algo, value, pinned = row
    return CachedImage(
        image_id,
        size or 0,
        hits or 0,
        accessed or 0.0,
        modified or 0.0,
        checksum,
        algo,
        value,
        pinned == 1,
    )


class SqliteDriver(FileBackedDriver):
    """Committed-image metadata in a local sqlite database."""

    name = "sqlite"
    # The central driver's local mirror reconciles later, once it has its cluster rows.
    reconcile_on_open = True

    def configure(self) -> None:
        super().configure()
        self.db_path = self.layout.base / self.config.image_cache_sqlite_db
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._hits_lock = threading.Lock()
        self._pending_hits: dict[str, tuple[int, float]] = {}
        self._pending_count = 0
        self._hit_timer: threading.Timer | None = None
        try:
            # One process at a time: workers of one service start together on a
            # new cache, and a second connection switching a brand-new database
            # to WAL while the first migrates it failed with "database is
            # locked" (a worker died at start-up, 1 run in ~10 with --workers 2).
            with open(self.layout.lock_path("sqlite-schema"), "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    self._migrate()
                except (sqlite3.DatabaseError, CacheStoreError) as exc:
                    if not _is_corrupt(exc):
                        raise
                    # The files are the truth and the metadata can be rebuilt
                    # from them (reconcile_records adopts every committed
                    # file), so a damaged database costs hit counts, pins and
                    # recorded hashes, never the service.
                    self._set_aside(exc)
                    self._migrate()
                if self.reconcile_on_open:
                    reconcile_records(self)
        except (sqlite3.DatabaseError, CacheStoreError) as exc:
            raise BadDriverConfiguration(
                self.name, f"cannot open or upgrade {self.db_path}: {exc}"
            ) from exc

    def _set_aside(self, exc: BaseException) -> None:
        """Move a damaged database (and its side files) aside, so a new one can be made.

        Hidden (``.cache.db.corrupt-<UTC time>``): a hidden name is never taken
        for an image, and ``clean`` leaves it alone, for the operator to
        inspect or delete.
        """
        self._close_connections()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.db_path.with_name(f".{self.db_path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm", "-journal"):
            source = self.db_path.with_name(self.db_path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                source.rename(aside.with_name(aside.name + suffix))
        log.error(
            "the cache database %s is damaged (%s); moved it to %s and rebuilding the"
            " metadata from the cached files: hit counts and pins are lost, and images"
            " without a recoverable hash are re-hashed by the next scrub",
            self.db_path,
            exc,
            aside,
        )

    def close(self) -> None:
        try:
            self.flush_hits()
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        with self._lock:
            for conn in list(self._connections):
                conn.close()
            self._connections = weakref.WeakSet()
        self._local = threading.local()

    # --- connections -----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        holder: _Connection | None = getattr(self._local, "conn", None)
        if holder is None:
            holder = _Connection(self.db_path)
            self._local.conn = holder
            with self._lock:
                self._connections.add(holder)
        return holder.conn

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; errors become CacheStoreError."""
        if self._pending_hits:
            self.flush_hits()
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CacheStoreError(f"sqlite metadata at {self.db_path}: {exc}") from exc

    def _query(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        if self._pending_hits:  # read our own hits; an unlocked peek is enough here
            self.flush_hits()
        try:
            return self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise CacheStoreError(f"sqlite metadata at {self.db_path}: {exc}") from exc

    def _migrate(self) -> None:
        with self._tx() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CacheStoreError(
                    f"schema version {version} is newer than this imagecache ({SCHEMA_VERSION})"
                )
            conn.execute(_GLANCE_TABLE)
            if version < 2:
                present = {row[1] for row in conn.execute("PRAGMA table_info(cached_images)")}
                for column, declaration in _COLUMNS_OF_2.items():
                    if column not in present:
                        conn.execute(f"ALTER TABLE cached_images ADD COLUMN {column} {declaration}")
                conn.execute(_LRU_INDEX)
                # Glance's rows may carry last_accessed = 0 for never-read images.
                conn.execute(
                    "UPDATE cached_images SET last_accessed = last_modified WHERE last_accessed = 0"
                )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- metadata hooks --------------------------------------------------------------------

    def _meta_commit(self, fill: Fill, size: int, now: float) -> None:
        with self._tx() as conn:
            # A re-fill of an image keeps its hit count and pin.
            conn.execute(
                "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits,"
                " checksum, hash_algo, hash_value, pinned) VALUES (?, ?, ?, ?, 0, ?, ?, ?, 0)"
                " ON CONFLICT (image_id) DO UPDATE SET last_accessed = excluded.last_accessed,"
                " last_modified = excluded.last_modified, size = excluded.size,"
                " checksum = excluded.checksum, hash_algo = excluded.hash_algo,"
                " hash_value = excluded.hash_value",
                (fill.image_id, now, now, size, fill.checksum, fill.hash_algo, fill.hash_value),
            )

    def _meta_forget(self, image_ids: Iterable[str]) -> None:
        with self._tx() as conn:
            conn.executemany(
                "DELETE FROM cached_images WHERE image_id = ?", ((i,) for i in image_ids)
            )

    def record_hit(self, image_id: str) -> None:
        self.layout.accept(image_id)
        now = time.time()
        with self._hits_lock:
            count, _ = self._pending_hits.get(image_id, (0, now))
            self._pending_hits[image_id] = (count + 1, now)
            self._pending_count += 1
            flush_now = self._pending_count >= HIT_BATCH
            if not flush_now and self._hit_timer is None:
                self._hit_timer = threading.Timer(HIT_DELAY, self._flush_hits_later)
                self._hit_timer.daemon = True
                self._hit_timer.start()
        if flush_now:
            self.flush_hits()

    def flush_hits(self) -> None:
        """Write the hits counted in memory (see HIT_BATCH); a no-op when there are none."""
        with self._hits_lock:
            pending, self._pending_hits, self._pending_count = self._pending_hits, {}, 0
            timer, self._hit_timer = self._hit_timer, None
        if timer is not None:
            timer.cancel()
        if not pending:
            return
        rows = [(count, at, image_id) for image_id, (count, at) in pending.items()]
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE cached_images SET hits = hits + ?, last_accessed = ?"
                    " WHERE image_id = ?",
                    rows,
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CacheStoreError(
                f"sqlite metadata at {self.db_path}: {len(rows)} hits not recorded: {exc}"
            ) from exc

    def _flush_hits_later(self) -> None:
        try:
            self.flush_hits()
        except CacheStoreError as exc:
            # No caller to raise to on the timer's thread.
            log.error("%s", exc)
        finally:
            # This short-lived thread opened its own connection; do not keep it.
            holder = getattr(self._local, "conn", None)
            if holder is not None:
                holder.close()
                self._local.conn = None

    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        self.layout.accept(image_id)
        with self._tx() as conn:
            cursor = conn.execute(
                "UPDATE cached_images SET pinned = ? WHERE image_id = ?", (int(pinned), image_id)
            )
            return cursor.rowcount > 0

    def record_image(self, image: CachedImage, *, replace: bool = False) -> bool:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with self._tx() as conn:
            cursor = conn.execute(
                f"{verb} INTO cached_images ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    image.image_id,
                    image.size,
                    image.hits,
                    image.last_accessed,
                    image.last_modified,
                    image.checksum,
                    image.hash_algo,
                    image.hash_value,
                    int(image.pinned),
                ),
            )
            return cursor.rowcount > 0

    # --- listings ----------------------------------------------------------------------------

    def get_cache_size(self) -> int:
        rows = self._query("SELECT COALESCE(SUM(size), 0) FROM cached_images")
        return int(rows[0][0])

    def get_cached_images(self) -> list[CachedImage]:
        # A plain table scan sorted here: ORDER BY image_id walks the primary-key
        # index and fetches each row by rowid, two to three times slower for
        # 100k UUID-named rows. Ids are unique, so tuples sort by id alone.
        rows = self._query(f"SELECT {_COLUMNS} FROM cached_images")  # noqa: S608
        rows.sort()
        return list(map(_row_to_image, rows))

    def iter_sizes(self) -> Iterator[tuple[str, int]]:
        return (
            (str(i), int(size))
            for i, size in self._query("SELECT image_id, size FROM cached_images")
        )

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        self.layout.accept(image_id)
        rows = self._query(
            f"SELECT {_COLUMNS} FROM cached_images WHERE image_id = ?",  # noqa: S608
            (image_id,),
        )
        return _row_to_image(rows[0]) if rows else None

    def get_hit_count(self, image_id: str) -> int:
        self.layout.accept(image_id)
        rows = self._query("SELECT hits FROM cached_images WHERE image_id = ?", (image_id,))
        return int(rows[0][0]) if rows else 0

    def get_least_recently_accessed(self) -> tuple[str, int] | None:
        return next(self.iter_lru(), None)

    def iter_lru(self) -> Iterator[tuple[str, int]]:
        rows = self._query(
            "SELECT image_id, size FROM cached_images WHERE pinned = 0 "
            "ORDER BY last_accessed, image_id"
        )
        for image_id, size in rows:
            yield image_id, int(size or 0)


# sqlite's result codes for a file that is not a database, or one whose pages are damaged.
_CORRUPT_CODES = frozenset(
    {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}
)


def _is_corrupt(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says the database file itself is damaged."""
    while exc is not None:
        if isinstance(exc, sqlite3.DatabaseError) and (
            getattr(exc, "sqlite_errorcode", None) in _CORRUPT_CODES
        ):
            return True
        exc = exc.__cause__
    return False


class _Connection:
    """A thread's connection; closed when the thread's local storage goes away."""

    def __init__(self, path: object) -> None:
        # isolation_level=None: we issue BEGIN ourselves, so single statements
        # (hit counts) commit at once without a Python-side transaction.
        self.conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, timeout=10.0
        )
        self.conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode is durable across process crashes; a power cut may
        # lose the last hits, never corrupt the database.
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        self.conn.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
