"""The cluster driver: metadata of many nodes in one SQL database, files local to each.

Every node keeps its images in its own cache directory, exactly as the other
drivers do (``FileBackedDriver``); only the metadata is central, in rows keyed
by ``(image_id, node_id)``, so one query answers "which nodes hold image X".
The schema and engine are in ``schema.py``, node identity and heartbeats in
``nodes.py``, origin-fill claims in ``claims.py``, cluster-wide deletion in
``deletions.py`` and the import of a sqlite cache in ``importer.py``; this
module is the driver contract over them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from imagecache import migrations
from imagecache.drivers.central.claims import OriginClaims
from imagecache.drivers.central.deletions import ClusterDeletions
from imagecache.drivers.central.importer import SqliteImport
from imagecache.drivers.central.nodes import node_instance_id, normalise_self_url
from imagecache.drivers.central.preheat import PreheatJobs
from imagecache.drivers.central.schema import (
    IMAGE_COLUMNS,
    brief,
    cached_images,
    deleted_images,
    make_engine,
    row_to_image,
    to_datetime,
)
from imagecache.drivers.files import Fill
from imagecache.errors import BadDriverConfiguration, CacheStoreError
from imagecache.reconcile import reconcile_records
from imagecache.records import CachedImage

log = logging.getLogger(__name__)


class CentralDriver(OriginClaims, ClusterDeletions, SqliteImport, PreheatJobs):
    """Files in the local cache directory, metadata in a database shared by the cluster."""

    name = "central"

    def configure(self) -> None:
        super().configure()
        if not self.settings.database_url:
            raise BadDriverConfiguration(
                self.name,
                "database_url is not set; give it the cluster database, e.g. "
                "postgresql+psycopg://user@host/imagecache",
            )
        if not self.settings.worker_self_reference_url:
            raise BadDriverConfiguration(
                self.name,
                "worker_self_reference_url is not set; it is this node's identity and the URL "
                "its siblings fetch images from, e.g. http://10.0.0.5:9393",
            )
        self.self_url = normalise_self_url(self.settings.worker_self_reference_url)
        self._beat_lock = threading.Lock()
        self._left = False
        self.instance_id = node_instance_id(self.layout.base)
        self.engine = make_engine(self.settings.database_url)
        try:
            with self._write() as conn:
                migrations.upgrade(conn)
            self.node_id = self._register()
            legacy = self.layout.base / self.settings.image_cache_sqlite_db
            if legacy.is_file():
                result = self.import_sqlite_cache(legacy)
                if result.imported:
                    log.info("imported %d entries of %s into the cluster", result.imported, legacy)
            reconcile_records(self)
        except (SQLAlchemyError, CacheStoreError) as exc:
            self.engine.dispose()
            raise BadDriverConfiguration(
                self.name, f"cannot use the database at database_url: {brief(exc)}"
            ) from exc
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.dispose()

    # --- agreeing with the files -----------------------------------------------------------------

    def record_image(self, image: CachedImage, *, replace: bool = False) -> bool:
        self.layout.validate(image.image_id)
        values = {
            "image_id": image.image_id,
            "node_id": self.node_id,
            "size": image.size,
            "hits": image.hits,
            "last_accessed": to_datetime(image.last_accessed),
            "last_modified": to_datetime(image.last_modified),
            "checksum": image.checksum,
            "hash_algo": image.hash_algo,
            "hash_value": image.hash_value,
            "pinned": image.pinned,
        }
        with self._write() as conn:
            if not replace:
                present = conn.execute(
                    select(cached_images.c.image_id).where(self._mine(image.image_id))
                ).first()
                if present is not None:
                    return False
            self._upsert_image(conn, values, keep=())
        return True

    def _meta_commit(self, fill: Fill, size: int, now: float) -> None:
        stamp = to_datetime(now)
        with self._write() as conn:
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
                raise CacheStoreError(
                    f"image {fill.image_id!r} was deleted during its fill; not kept"
                )
            # A re-fill of an image keeps its hit count and pin.
            self._upsert_image(
                conn,
                {
                    "image_id": fill.image_id,
                    "node_id": self.node_id,
                    "size": size,
                    "hits": 0,
                    "last_accessed": stamp,
                    "last_modified": stamp,
                    "checksum": fill.checksum,
                    "hash_algo": fill.hash_algo,
                    "hash_value": fill.hash_value,
                    "pinned": False,
                },
                keep=("hits", "pinned"),
            )
            # Filler becomes holder in one step: no moment when the cluster sees neither.
            conn.execute(self._forget_origin_fill(fill.image_id))

    def _meta_rollback(self, fill: Fill, reason: str) -> None:
        # This node no longer fills the image: others must not follow it.
        with self._write() as conn:
            conn.execute(self._forget_origin_fill(fill.image_id))

    def _meta_forget(self, image_ids: Iterable[str]) -> None:
        params = [{"doomed": image_id} for image_id in image_ids]
        if not params:
            return
        statement = delete(cached_images).where(
            cached_images.c.node_id == self.node_id,
            cached_images.c.image_id == bindparam("doomed"),
        )
        with self._write() as conn:
            conn.execute(statement, params)

    def record_hit(self, image_id: str) -> None:
        with self._write() as conn:
            conn.execute(
                update(cached_images)
                .where(self._mine(image_id))
                .values(hits=cached_images.c.hits + 1, last_accessed=datetime.now(UTC))
            )

    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(cached_images).where(self._mine(image_id)).values(pinned=pinned)
            )
        return result.rowcount > 0

    def _mine(self, image_id: str) -> Any:
        """This node's row of ``image_id``; the id is checked first, as every driver does."""
        self.layout.validate(image_id)
        return and_(cached_images.c.node_id == self.node_id, cached_images.c.image_id == image_id)

    # --- listings ----------------------------------------------------------------------------

    def get_cache_size(self) -> int:
        query = select(func.coalesce(func.sum(cached_images.c.size), 0)).where(
            cached_images.c.node_id == self.node_id
        )
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def get_cached_images(self) -> list[CachedImage]:
        query = (
            select(*IMAGE_COLUMNS)
            .where(cached_images.c.node_id == self.node_id)
            .order_by(cached_images.c.image_id)
        )
        with self._read() as conn:
            return [row_to_image(row) for row in conn.execute(query)]

    def iter_sizes(self) -> Iterator[tuple[str, int]]:
        query = select(cached_images.c.image_id, cached_images.c.size).where(
            cached_images.c.node_id == self.node_id
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return ((str(i), int(size)) for i, size in rows)

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        with self._read() as conn:
            row = conn.execute(select(*IMAGE_COLUMNS).where(self._mine(image_id))).first()
        return row_to_image(row) if row is not None else None

    def get_hit_count(self, image_id: str) -> int:
        with self._read() as conn:
            hits = conn.execute(
                select(cached_images.c.hits).where(self._mine(image_id))
            ).scalar_one_or_none()
        return int(hits) if hits is not None else 0

    def get_least_recently_accessed(self) -> tuple[str, int] | None:
        return next(self.iter_lru(), None)

    def iter_lru(self) -> Iterator[tuple[str, int]]:
        query = (
            select(cached_images.c.image_id, cached_images.c.size)
            .where(cached_images.c.node_id == self.node_id, cached_images.c.pinned.is_(False))
            .order_by(cached_images.c.last_accessed, cached_images.c.image_id)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        for image_id, size in rows:
            yield image_id, int(size)
