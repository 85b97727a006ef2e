"""The cluster driver: metadata of many nodes in one SQL database, files local to each.

Every node keeps its images in its own cache directory, exactly as the other
drivers do (``FileBackedDriver``); the metadata is central, in rows keyed by
``(image_id, node_id)``, so one query answers "which nodes hold image X".
The schema and engine are in ``schema.py``, node identity and heartbeats in
``nodes.py``, origin-fill claims in ``claims.py``, cluster-wide deletion in
``deletions.py``, the import of a sqlite cache in ``importer.py``, the local
mirror of this node's rows in ``mirror.py`` and the write-behind to the
database in ``outbox.py``; this module is the driver contract over them.

**Hits never touch the database (issue 16).** This node's own rows are kept
in a local sqlite database, the mirror (the sqlite driver's table and code),
and every question about this node's images (a hit's record, listings,
sizes, LRU order, hit counts) is answered from it; hits are counted there in
batches exactly as the sqlite driver counts them. The database learns of a
change afterwards: at once for a commit, deletion or pin when it answers
(``push``, after the local write), and with every heartbeat for the rest,
hit counts included (``drain``). Only cluster-wide questions go to the
database: who holds an image, who reads it from the origin, the node list,
cluster deletion. The local row is the truth about this node: the database's
rows of it are overwritten with the local ones, and removed where there is
no local one (``resync``, at start and when the database comes back).

**When the database is away** the node keeps serving hits and filling from
the origin: the origin claim is skipped (the node may read an image another
site's node reads too: cheaper than not serving), the commit is local and
queued, and the check "a deletion during the fill wins" is made when the
queue is written (``_write_rows``); cluster reads fail at once instead of
after a connect timeout (the sibling origin then reads the origin). The
service's heartbeat (``sync``) notices the database is back: it beats, writes
the queue, resyncs and applies the deletions made through other nodes
meanwhile, with no restart. Readiness says not ready with the queue's depth.

**Starting without the database.** The first start of a cache directory
with a database needs it: the node's id comes from registering. A directory
that has joined that database under that URL before remembers its id (in the
mirror), so it starts and serves what it holds, and registers when the
database answers; otherwise start-up fails as before (BadDriverConfiguration).

**Decisions, and why.**

- Hit counts travel as the local absolute count, not as increments: the
  local row is authoritative for this node's row, and an absolute value can
  be written twice (a retry after a commit whose answer was lost) without
  counting hits twice.
- Commits, deletions and pins are written through at once when the database
  answers, rather than only at the next heartbeat: siblings should find a new
  copy (and stop asking for a deleted one) within milliseconds, as before.
  Hits alone wait for the heartbeat; they are the request path.
- The outbox is a table keyed by image id, filled by triggers on the local
  table: bounded by the number of images, and no code path can change a row
  without queueing it.
- What "away" means: the database failed (an error, or ``database_timeout``
  to connect) within the last ``node_heartbeat_interval``; requests then do
  not wait on it again until that much later. A partition that drops packets
  is detected by ``tcp_user_timeout``; a middlebox that keeps acknowledging
  while forwarding nothing (the test relay's black hole alone) is not, on a
  connection already open: cut tests reset those connections too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from imagecache import migrations
from imagecache.drivers.central.claims import OriginClaims
from imagecache.drivers.central.deletions import ClusterDeletions
from imagecache.drivers.central.importer import SqliteImport
from imagecache.drivers.central.mirror import Mirror
from imagecache.drivers.central.nodes import node_instance_id, normalise_self_url
from imagecache.drivers.central.outbox import WriteBehind
from imagecache.drivers.central.preheat import PreheatJobs
from imagecache.drivers.central.schema import (
    IMAGE_COLUMNS,
    brief,
    cached_images,
    deleted_images,
    is_database_error,
    make_engine,
    row_to_image,
    to_datetime,
)
from imagecache.drivers.files import Fill
from imagecache.errors import BadDriverConfiguration, CacheStoreError, DeletedDuringFill
from imagecache.reconcile import reconcile_records
from imagecache.records import CachedImage

log = logging.getLogger(__name__)


class CentralDriver(WriteBehind, OriginClaims, ClusterDeletions, SqliteImport, PreheatJobs):
    """Files in the local cache directory, metadata in a database shared by the cluster."""

    name = "central"

    def configure(self) -> None:
        super().configure()
        if not self.config.database_url:
            raise BadDriverConfiguration(
                self.name,
                "database_url is not set; give it the cluster database, e.g. "
                "postgresql+psycopg://user@host/imagecache",
            )
        if not self.config.worker_self_reference_url:
            raise BadDriverConfiguration(
                self.name,
                "worker_self_reference_url is not set; it is this node's identity and the URL "
                "its siblings fetch images from, e.g. http://10.0.0.5:9393",
            )
        self.self_url = normalise_self_url(self.config.worker_self_reference_url)
        self._beat_lock = threading.Lock()
        self._left = False
        self._registered = False
        self._init_write_behind()
        self.instance_id = node_instance_id(self.layout.base)
        self.engine = make_engine(self.config.database_url, self.config.database_timeout)
        self.mirror = Mirror.over(self.config)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        url = self.config.database_url
        assert url is not None
        known = self.mirror.known_node_id(url, self.self_url)
        try:
            self._join()
        except (SQLAlchemyError, CacheStoreError) as exc:
            if known is None or not is_database_error(exc):
                raise BadDriverConfiguration(
                    self.name, f"cannot use the database at database_url: {brief(exc)}"
                ) from exc
            log.error(
                "starting without the cluster database (%s): serving this node's %d images"
                " from its local records; it joins the cluster when the database answers",
                brief(exc),
                len(list(self.mirror.iter_sizes())),
            )
            self.node_id = known
            self._registered = False
            self._went_offline(exc)
            reconcile_records(self)
            return
        try:
            if known != self.node_id:
                self._seed()
            legacy = self.layout.base / self.config.image_cache_sqlite_db
            if legacy.is_file():
                result = self.import_sqlite_cache(legacy)
                if result.imported:
                    log.info("imported %d entries of %s into the cluster", result.imported, legacy)
            reconcile_records(self)
            self.resync()
        except (SQLAlchemyError, CacheStoreError) as exc:
            raise BadDriverConfiguration(
                self.name, f"cannot use the database at database_url: {brief(exc)}"
            ) from exc

    def _join(self) -> None:
        """Upgrade the schema, register this node and remember its id locally."""
        with self._write() as conn:
            migrations.upgrade(conn)
        self.node_id = self._register()
        self._registered = True
        assert self.config.database_url is not None
        self.mirror.remember_node_id(self.config.database_url, self.self_url, self.node_id)

    def _seed(self) -> None:
        """Fill a new mirror from the database's rows of this node (hits, hashes, pins kept).

        The first start after an upgrade from a release without the mirror:
        the database was the only record. Only rows whose file is here count.
        """
        with self._read() as conn:
            rows = conn.execute(
                select(*IMAGE_COLUMNS).where(cached_images.c.node_id == self.node_id)
            ).all()
        for row in rows:
            image = row_to_image(row)
            if self.layout.is_valid(image.image_id) and self.is_cached(image.image_id):
                self.mirror.record_image(image, replace=True)

    def sync(self) -> list[str]:
        """One heartbeat of the service: beat, write the outbox, apply deletions made elsewhere.

        Returns the images dropped because they were deleted through another
        node. With the database away it returns nothing and the node stays
        offline (``outbox.py``); the first beat that reaches it again
        registers (after an offline start), writes the queue and resyncs.
        """
        try:
            if not self._registered:
                self._join()
            if not self.heartbeat():
                # Left, or another directory took this URL (logged by heartbeat):
                # the node's rows are not this directory's to write any more.
                return []
            self._came_back()
            self.drain()
            if self._resync_due:
                self.resync()
            return self.apply_deletions()
        except CacheStoreError as exc:
            if not is_database_error(exc):
                raise
            self._went_offline(exc)
            return []

    def close(self) -> None:
        mirror = getattr(self, "mirror", None)
        if mirror is not None:
            try:
                mirror.flush_hits()
                if getattr(self, "_registered", False) and not self.offline:
                    self.drain()  # hits of the last moments; the outbox keeps them if this fails
            except CacheStoreError as exc:
                log.warning("could not write the last changes to the cluster database: %s", exc)
            finally:
                mirror.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.dispose()

    # --- agreeing with the files -----------------------------------------------------------------

    def record_image(self, image: CachedImage, *, replace: bool = False) -> bool:
        self.layout.accept(image.image_id)
        written = self.mirror.record_image(image, replace=replace)
        if written:
            self.push([image.image_id])
        return written

    def _meta_commit(self, fill: Fill, size: int, now: float) -> None:
        local = [False]  # whether the local row was written in the attempt below
        if self._worth_trying():
            try:
                self._commit_online(fill, size, now, local)
                return
            except DeletedDuringFill:
                raise
            except CacheStoreError as exc:
                if not is_database_error(exc):
                    raise
                self._went_offline(exc)
        # Committed locally; the deletion check waits for the database (_write_rows).
        self.mirror.note_unchecked(fill.image_id, fill.started_at)
        if not local[0]:
            self.mirror._meta_commit(fill, size, now)

    def _commit_online(self, fill: Fill, size: int, now: float, local: list[bool]) -> None:
        with self._pushing(self.config.database_timeout), self._write() as conn:
            # An image deleted through any node after this fill began is not
            # kept: the deletion wins (its local half is FileBackedDriver.cancel_fill;
            # this is the other nodes'). Checked in the commit's own transaction.
            # Two nodes' clocks are compared, as deleted_since_made does.
            deleted = conn.execute(
                select(deleted_images.c.image_id).where(
                    deleted_images.c.image_id == fill.image_id,
                    deleted_images.c.deleted_at >= to_datetime(fill.started_at),
                )
            ).first()
            if deleted is not None:
                raise DeletedDuringFill(fill.image_id)
            # Local first, inside the database's transaction: if the local
            # write fails the central one rolls back with it. If the central
            # commit fails after it, the local row stands (the file is here)
            # and the outbox still holds it, for the drain to check and write.
            self.mirror._meta_commit(fill, size, now)
            local[0] = True
            # This fill's check supersedes one left by an offline commit before it.
            self.mirror.checked([fill.image_id])
            version = self.mirror.pending_version(fill.image_id)
            self._write_rows(conn, [fill.image_id])
            # Filler becomes holder in one step: no moment when the cluster sees neither.
            conn.execute(self._forget_origin_fill(fill.image_id))
        if version is not None:
            self.mirror.pushed([(version, fill.image_id)])
        self._came_back()

    def _meta_rollback(self, fill: Fill, reason: str) -> None:
        # This node no longer fills the image: others must not follow it.
        if not self._worth_trying():
            return  # no claim was taken while offline
        try:
            with self._write() as conn:
                conn.execute(self._forget_origin_fill(fill.image_id))
        except CacheStoreError as exc:
            if not is_database_error(exc):
                raise
            # Its node's claim is void once it stops beating or when it fills again.
            self._went_offline(exc)

    def _meta_forget(self, image_ids: Iterable[str]) -> None:
        doomed = list(image_ids)
        if not doomed:
            return
        self.mirror.forget_records(doomed)
        self.push(doomed)

    def record_hit(self, image_id: str) -> None:
        image_id = self.layout.accept(image_id)  # this directory's rules cover the mirror's
        self.mirror.record_hit(image_id)  # local, batched; the heartbeat's drain writes it

    def flush_hits(self) -> None:
        self.mirror.flush_hits()

    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        image_id = self.layout.accept(image_id)
        changed = self.mirror.set_pinned(image_id, pinned)
        if changed:
            self.push([image_id])
        return changed

    # --- listings: this node's rows, from the mirror ---------------------------------------

    def get_cache_size(self) -> int:
        return self.mirror.get_cache_size()

    def get_cached_images(self) -> list[CachedImage]:
        return self.mirror.get_cached_images()

    def iter_sizes(self) -> Iterator[tuple[str, int]]:
        return self.mirror.iter_sizes()

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        image_id = self.layout.accept(image_id)
        return self.mirror.get_cached_image(image_id)

    def get_hit_count(self, image_id: str) -> int:
        image_id = self.layout.accept(image_id)
        return self.mirror.get_hit_count(image_id)

    def get_least_recently_accessed(self) -> tuple[str, int] | None:
        return self.mirror.get_least_recently_accessed()

    def iter_lru(self) -> Iterator[tuple[str, int]]:
        return self.mirror.iter_lru()
