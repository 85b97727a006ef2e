"""The cluster driver: metadata of many nodes in one SQL database, files local to each.

Every node keeps its images in its own cache directory, exactly as the other
drivers do (``FileBackedDriver``); only the metadata is central, in rows keyed
by ``(image_id, node_id)``, so one query answers "which nodes hold image X".
SQLAlchemy Core over PostgreSQL (psycopg 3) in production, SQLite for a
single-machine trial and the tests.

Node identity. A node is its self URL (``worker_self_reference_url``), the
address siblings use to fetch images from it. Two live nodes must never share
a URL, yet the worker processes of one node, and that node restarted a second
after it stopped, must be let in. What tells them apart is the cache
directory: each directory gets a random id once (``<dir>/.node-id``; hidden
names are never image ids), stored with the node's row. The same URL with the
same directory id is the same node; with another id it is refused while the
holder's heartbeat is younger than ``node_dead_after``, and taken over (its
rows dropped, they describe files elsewhere) once it is older.

Times are ``DateTime(timezone=True)`` columns written as aware UTC values and
read back as epoch seconds, whatever the host's or the session's time zone
(Glance's central driver stores naive values and reads them as local time).
SQLite keeps no zone, so a naive value read back is UTC by construction.
Liveness compares heartbeats written with each node's clock: nodes must keep
their clocks in sync (NTP) to well under ``node_dead_after``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError

from imagecache import migrations
from imagecache.drivers.files import FileBackedDriver, Fill
from imagecache.errors import BadDriverConfiguration, CacheStoreError
from imagecache.layout import fsync_dir
from imagecache.reconcile import reconcile_records
from imagecache.records import CachedImage

log = logging.getLogger(__name__)

NODE_ID_FILE = ".node-id"

# The schema at head, for queries; the migrations in imagecache/migrations
# create it and must stay in step with these definitions.
metadata = MetaData()

nodes = Table(
    "nodes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", String(2048), nullable=False, unique=True),
    Column("instance_id", String(64), nullable=False),
    Column("heartbeat", DateTime(timezone=True), nullable=False),
    Column("started", DateTime(timezone=True), nullable=False),
)

cached_images = Table(
    "cached_images",
    metadata,
    Column("image_id", String(255), primary_key=True),
    Column("node_id", Integer, ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("hits", BigInteger, nullable=False),
    Column("last_accessed", DateTime(timezone=True), nullable=False),
    Column("last_modified", DateTime(timezone=True), nullable=False),
    Column("checksum", String(32)),
    Column("hash_algo", String(16)),
    Column("hash_value", String(128)),
    Column("pinned", Boolean, nullable=False),
)

deleted_images = Table(
    "deleted_images",
    metadata,
    Column("image_id", String(255), primary_key=True),
    Column("deleted_at", DateTime(timezone=True), nullable=False),
)

# One row per image some node is reading from the origin now (see OriginClaim).
origin_fills = Table(
    "origin_fills",
    metadata,
    Column("image_id", String(255), primary_key=True),
    Column("node_id", Integer, ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("started", DateTime(timezone=True), nullable=False),
)

# First key of the two-key advisory locks that guard origin reads, one lock per
# image (second key: hashtext of the id); the two-key space never meets the
# single bigint key of the migration lock.
ORIGIN_LOCK_SPACE = 0x1AC0

_IMAGE_COLUMNS = (
    cached_images.c.image_id,
    cached_images.c.size,
    cached_images.c.hits,
    cached_images.c.last_accessed,
    cached_images.c.last_modified,
    cached_images.c.checksum,
    cached_images.c.hash_algo,
    cached_images.c.hash_value,
    cached_images.c.pinned,
)


def to_datetime(epoch: float) -> datetime:
    """Epoch seconds as an aware UTC datetime, for a timestamptz column."""
    return datetime.fromtimestamp(epoch, UTC)


def to_epoch(value: datetime) -> float:
    """A stored timestamp as epoch seconds; naive values (SQLite) are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _row_to_image(row: Sequence[Any]) -> CachedImage:
    image_id, size, hits, accessed, modified, checksum, algo, value, pinned = row
    return CachedImage(
        image_id=image_id,
        size=int(size),
        hits=int(hits),
        last_accessed=to_epoch(accessed),
        last_modified=to_epoch(modified),
        checksum=checksum,
        hash_algo=algo,
        hash_value=value,
        pinned=bool(pinned),
    )


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One registered node, as ``list_nodes`` shows it."""

    url: str
    heartbeat: float
    started: float
    alive: bool


@dataclass(frozen=True, slots=True)
class NodeListing:
    """One node of ``cluster_listing``: its state and the copies it is offered with."""

    node: NodeInfo
    images: list[CachedImage]

    def as_dict(self) -> dict[str, Any]:
        return {
            "alive": self.node.alive,
            "heartbeat": self.node.heartbeat,
            "started": self.node.started,
            "cached_images": [image.as_dict() for image in self.images],
        }


@dataclass(frozen=True, slots=True)
class ImportResult:
    """What ``import_sqlite_cache`` did with the rows of a single-node ``cache.db``."""

    imported: int
    already_present: int
    missing_file: int


def make_engine(database_url: str) -> Engine:
    """An engine for ``database_url``; BadDriverConfiguration if it cannot be one."""
    try:
        url = make_url(database_url)
        if url.get_backend_name() == "postgresql":
            if url.drivername == "postgresql":
                # Plain "postgresql://" would pick psycopg2, which we do not ship.
                url = url.set(drivername="postgresql+psycopg")
            engine = create_engine(
                url, pool_size=4, max_overflow=8, pool_pre_ping=True, pool_recycle=1800
            )
        elif url.get_backend_name() == "sqlite":
            if not url.database or url.database == ":memory:":
                raise BadDriverConfiguration(
                    "central", "database_url must name a SQLite file every node process can open"
                )
            engine = create_engine(url, connect_args={"timeout": 30.0})
            _tune_sqlite(engine)
        else:
            raise BadDriverConfiguration(
                "central",
                f"database_url uses {url.get_backend_name()!r}; use postgresql+psycopg:// or "
                "sqlite:///",
            )
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise BadDriverConfiguration("central", f"database_url is not usable: {exc}") from exc
    return engine


def _tune_sqlite(engine: Engine) -> None:
    """WAL, a busy timeout, and writes that take the write lock up front.

    pysqlite's own transaction handling begins lazily and upgrades a read
    lock to a write lock mid-transaction, which SQLite answers with an
    immediate "database is locked" when another process writes. Write
    transactions here say ``BEGIN IMMEDIATE`` instead (see ``_write``).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        dbapi_connection.execute("PRAGMA journal_mode = WAL")
        dbapi_connection.execute("PRAGMA synchronous = NORMAL")
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get("imagecache_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def node_instance_id(base: Path) -> str:
    """The random id of this cache directory, created on first use.

    Several workers start together on a new directory, so the file appears
    whole or not at all: the id is written to a private temporary file, made
    durable, then linked into place; the first link wins and every process
    reads the winner's. (Created empty and written after, as it was, a sibling
    could read it in between, find it empty and die.)
    """
    path = base / NODE_ID_FILE
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        tmp = base / f"{NODE_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            try:
                os.write(fd, uuid.uuid4().hex.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process won: read theirs
                os.link(tmp, path)
                fsync_dir(base)
        finally:
            tmp.unlink(missing_ok=True)
        value = path.read_text().strip()
    if not value:
        raise BadDriverConfiguration("central", f"{path} is empty; remove it and restart")
    return value


def normalise_self_url(value: str) -> str:
    """The node URL as stored: no trailing slash; only http(s) URLs with a host."""
    url = value.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise BadDriverConfiguration(
            "central",
            f"worker_self_reference_url must be an http(s) URL siblings can reach, got {value!r}",
        )
    return url


class OriginClaim:
    """This node's right to read one image from the origin; ``release()`` when the read ends.

    On PostgreSQL the right is a session advisory lock held on a connection of
    its own: if the node dies the server drops the connection and the lock
    with it at once. SQLite has no such locks; there the ``origin_fills`` row
    is the claim, and a row whose node stopped beating is void.

    The row tells the other nodes whom to fetch from meanwhile, and it outlives
    ``release()``: it goes in the same transaction that records the committed
    copy (or when the fill rolls back). Deleting it when the origin read ends
    would leave a gap, between the last byte and the commit, in which the
    image is neither being filled nor cached as far as the cluster can see,
    and a node asking then would read the origin a second time.
    """

    def __init__(self, driver: CentralDriver, image_id: str, conn: Connection | None) -> None:
        self.driver = driver
        self.image_id = image_id
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            _unlock_origin(conn, self.image_id)


def _unlock_origin(conn: Connection, image_id: str) -> None:
    """Drop the advisory lock of ``image_id`` held by ``conn``'s session, and the connection.

    A pooled connection keeps its session, and a session keeps its advisory
    locks: unlock explicitly, and if that fails discard the connection so the
    server ends the session (and the lock) rather than pooling it.
    """
    try:
        conn.execute(select(func.pg_advisory_unlock(ORIGIN_LOCK_SPACE, func.hashtext(image_id))))
        conn.commit()
    except SQLAlchemyError as exc:
        log.warning("could not unlock the origin read of %s: %s", image_id, _brief(exc))
        conn.invalidate()
    finally:
        conn.close()


class CentralDriver(FileBackedDriver):
    """Files in the local cache directory, metadata in a database shared by the cluster."""

    name = "central"

    node_id: int
    self_url: str
    instance_id: str
    engine: Engine

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
                self.name, f"cannot use the database at database_url: {_brief(exc)}"
            ) from exc
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.dispose()

    # --- database access ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction; database errors become CacheStoreError."""
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(imagecache_write=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise CacheStoreError(f"central metadata: {_brief(exc)}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise CacheStoreError(f"central metadata: {_brief(exc)}") from exc

    def _upsert_image(self, conn: Connection, values: dict[str, Any], keep: Iterable[str]) -> None:
        """Insert a row of ``cached_images``; on conflict overwrite all but ``keep``."""
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(cached_images).values(**values)
        kept = set(keep) | {"image_id", "node_id"}
        changed = {k: statement.excluded[k] for k in values if k not in kept}
        key = [cached_images.c.image_id, cached_images.c.node_id]
        if changed:
            conn.execute(statement.on_conflict_do_update(index_elements=key, set_=changed))
        else:
            conn.execute(statement.on_conflict_do_nothing(index_elements=key))

    # --- nodes ---------------------------------------------------------------------------

    def _register(self) -> int:
        """Claim this node's URL; refuse it while another live node holds it."""
        for _ in range(3):
            now = datetime.now(UTC)
            try:
                with self._write() as conn:
                    row = conn.execute(
                        select(nodes.c.id, nodes.c.instance_id, nodes.c.heartbeat)
                        .where(nodes.c.url == self.self_url)
                        .with_for_update()
                    ).first()
                    if row is None:
                        return int(
                            conn.execute(
                                insert(nodes)
                                .values(
                                    url=self.self_url,
                                    instance_id=self.instance_id,
                                    heartbeat=now,
                                    started=now,
                                )
                                .returning(nodes.c.id)
                            ).scalar_one()
                        )
                    node_id, instance_id, heartbeat = row
                    if instance_id != self.instance_id:
                        age = now.timestamp() - to_epoch(heartbeat)
                        if age < self.settings.node_dead_after:
                            raise BadDriverConfiguration(
                                self.name,
                                f"worker_self_reference_url {self.self_url} is already used by "
                                f"another live node (its cache directory differs; last heartbeat "
                                f"{age:.1f}s ago). Give each node its own URL, or wait "
                                f"node_dead_after={self.settings.node_dead_after:g}s after "
                                "stopping the other one",
                            )
                        log.warning(
                            "taking over node URL %s from a dead node (heartbeat %.0fs ago); "
                            "dropping its rows, they describe another cache directory",
                            self.self_url,
                            age,
                        )
                        conn.execute(
                            delete(cached_images).where(cached_images.c.node_id == node_id)
                        )
                    conn.execute(
                        update(nodes)
                        .where(nodes.c.id == node_id)
                        .values(instance_id=self.instance_id, heartbeat=now, started=now)
                    )
                    return int(node_id)
            except CacheStoreError as exc:
                # Two first starts of one URL raced on the unique constraint: look again.
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise CacheStoreError(f"could not register node {self.self_url}: lost every race")

    def heartbeat(self) -> bool:
        """Tell the cluster this node is alive; False if another node took its URL or it left."""
        with self._beat_lock:
            if self._left:
                return False  # a beat still in flight when the node stopped must not revive it
            return self._beat()

    def _beat(self) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(nodes)
                .where(nodes.c.id == self.node_id, nodes.c.instance_id == self.instance_id)
                .values(heartbeat=datetime.now(UTC))
            )
        if result.rowcount == 0:
            log.error(
                "node URL %s now belongs to another cache directory; this node is not "
                "announced to the cluster any more (restart it with its own URL)",
                self.self_url,
            )
            return False
        return True

    def leave(self) -> None:
        """Tell the cluster this node is stopping: it is not offered as a source from now on.

        Its rows stay: when it comes back (same directory) its copies are offered again.
        Later heartbeats of this driver do nothing.
        """
        with self._beat_lock:
            self._left = True
            self._mark_gone()

    def _mark_gone(self) -> None:
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == self.node_id, nodes.c.instance_id == self.instance_id)
                .values(heartbeat=to_datetime(0.0))
            )

    def _alive_cutoff(self) -> datetime:
        return to_datetime(time.time() - self.settings.node_dead_after)

    def list_nodes(self) -> list[NodeInfo]:
        """Every registered node, dead or alive, by URL."""
        cutoff = self._alive_cutoff()
        with self._read() as conn:
            rows = conn.execute(
                select(nodes.c.url, nodes.c.heartbeat, nodes.c.started).order_by(nodes.c.url)
            ).all()
        return [
            NodeInfo(
                url=url,
                heartbeat=to_epoch(beat),
                started=to_epoch(started),
                alive=to_epoch(beat) > cutoff.timestamp(),
            )
            for url, beat, started in rows
        ]

    def get_cluster_images(self) -> list[tuple[str, CachedImage]]:
        """``(node URL, record)`` of every copy on every live node, by image id then URL."""
        query = (
            select(nodes.c.url, *_IMAGE_COLUMNS)
            .select_from(cached_images.join(nodes, nodes.c.id == cached_images.c.node_id))
            .where(nodes.c.heartbeat > self._alive_cutoff(), ~_deleted_since_made())
            .order_by(cached_images.c.image_id, nodes.c.url)
        )
        with self._read() as conn:
            return [(row[0], _row_to_image(row[1:])) for row in conn.execute(query)]

    def cluster_listing(self) -> list[NodeListing]:
        """Every registered node with the copies it holds, by URL.

        A dead node is listed with no images: its copies are not offered to
        anyone until it beats again (as ``get_cached_nodes`` and fills see it).
        """
        held: dict[str, list[CachedImage]] = {}
        for url, image in self.get_cluster_images():
            held.setdefault(url, []).append(image)
        return [NodeListing(node, held.get(node.url, [])) for node in self.list_nodes()]

    def get_cached_nodes(self, image_id: str) -> list[str]:
        """URLs of the live nodes holding a copy not marked deleted since it was made."""
        self.layout.validate(image_id)
        with self._read() as conn:
            return [url for (url,) in conn.execute(self._holders(image_id).order_by(nodes.c.url))]

    def _holders(self, image_id: str) -> Any:
        """URLs of the live nodes whose copy of ``image_id`` is not condemned (a query)."""
        return (
            select(nodes.c.url)
            .select_from(cached_images.join(nodes, nodes.c.id == cached_images.c.node_id))
            .where(
                cached_images.c.image_id == image_id,
                nodes.c.heartbeat > self._alive_cutoff(),
                ~_deleted_since_made(),
            )
        )

    # --- who reads the origin ---------------------------------------------------------------------

    def claim_origin_fill(
        self, image_id: str, unreachable: Collection[str] = ()
    ) -> OriginClaim | None:
        """Claim the one origin read of ``image_id`` in the cluster; None if another node has it.

        The row of a live node stands even when its lock is free: its read is
        over and its commit is on the way (see ``OriginClaim``). It is void when
        its node stopped beating, is this node, or is in ``unreachable`` (the
        caller could not fetch from it: it died before its heartbeat went stale).
        None too when a live node other than this one, and not in ``unreachable``,
        holds a copy: the caller should fetch it from there.
        """
        self.layout.validate(image_id)
        now = datetime.now(UTC)
        lock_conn: Connection | None = None
        if self.engine.dialect.name == "postgresql":
            try:
                lock_conn = self.engine.connect()
                got = lock_conn.execute(
                    select(func.pg_try_advisory_lock(ORIGIN_LOCK_SPACE, func.hashtext(image_id)))
                ).scalar_one()
                lock_conn.commit()  # the session lock outlives the transaction
            except SQLAlchemyError as exc:
                if lock_conn is not None:
                    lock_conn.close()
                raise CacheStoreError(f"central metadata: {_brief(exc)}") from exc
            if not got:
                lock_conn.close()
                return None
        claimed = False
        try:
            with self._write() as conn:
                row = conn.execute(
                    select(origin_fills.c.node_id, nodes.c.url, nodes.c.heartbeat)
                    .select_from(origin_fills.join(nodes, nodes.c.id == origin_fills.c.node_id))
                    .where(origin_fills.c.image_id == image_id)
                ).first()
                if row is not None:
                    holder, url, beat = row
                    void = (
                        holder == self.node_id
                        or url in unreachable
                        or to_epoch(beat) < self._alive_cutoff().timestamp()
                    )
                    if not void:
                        return None
                    conn.execute(delete(origin_fills).where(origin_fills.c.image_id == image_id))
                # Another node may have read and committed the image since the caller
                # last looked (its row went with its commit): fetch from it instead.
                holders = conn.execute(self._holders(image_id)).scalars()
                if any(url not in unreachable and url != self.self_url for url in holders):
                    return None
                conn.execute(
                    insert(origin_fills).values(
                        image_id=image_id, node_id=self.node_id, started=now
                    )
                )
                claimed = True
        finally:
            if not claimed and lock_conn is not None:
                _unlock_origin(lock_conn, image_id)
        return OriginClaim(self, image_id, lock_conn)

    def origin_filler(self, image_id: str) -> str | None:
        """URL of the live node (not this one) reading ``image_id`` from the origin now."""
        query = (
            select(nodes.c.url)
            .select_from(origin_fills.join(nodes, nodes.c.id == origin_fills.c.node_id))
            .where(
                origin_fills.c.image_id == image_id,
                origin_fills.c.node_id != self.node_id,
                nodes.c.heartbeat > self._alive_cutoff(),
            )
        )
        with self._read() as conn:
            url = conn.execute(query).scalar_one_or_none()
        return str(url) if url is not None else None

    # --- cluster-wide deletion -------------------------------------------------------------------

    def delete_everywhere(self, image_id: str) -> bool:
        """Mark the image deleted for every node and drop this node's copy now.

        Other nodes drop theirs at their next ``apply_deletions`` (the service
        runs it with every heartbeat). A copy filled after the mark is kept:
        the mark only condemns copies made before it.
        """
        self.layout.validate(image_id)
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(deleted_images).values(
            image_id=image_id, deleted_at=datetime.now(UTC)
        )
        statement = statement.on_conflict_do_update(
            index_elements=[deleted_images.c.image_id],
            set_={"deleted_at": statement.excluded.deleted_at},
        )
        with self._write() as conn:
            conn.execute(statement)
        return self.delete_cached_image(image_id)

    def apply_deletions(self) -> list[str]:
        """Drop this node's copies of images marked deleted after they were made."""
        query = select(cached_images.c.image_id).where(
            cached_images.c.node_id == self.node_id, _deleted_since_made()
        )
        with self._read() as conn:
            doomed = [image_id for (image_id,) in conn.execute(query)]
        for image_id in doomed:
            log.info("dropping %s: it was deleted through another node", image_id)
            self.delete_cached_image(image_id)
        return doomed

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

    # --- adopting a single-node cache ------------------------------------------------------------

    def import_sqlite_cache(self, db_path: Path | None = None) -> ImportResult:
        """Copy the rows of a single-node ``cache.db`` (Glance's or ours) into this node's rows.

        Hits, access and modification times, digests and pins are kept. A row
        whose file is not in this cache directory is skipped (it describes
        nothing), and so is a row this node already has centrally (the central
        one is newer). Idempotent: configure() runs it at every start while the
        file is there. The sqlite file is only read, never changed.
        """
        path = db_path or self.layout.base / self.settings.image_cache_sqlite_db
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
        with self._read() as conn:
            known = set(
                conn.execute(
                    select(cached_images.c.image_id).where(cached_images.c.node_id == self.node_id)
                ).scalars()
            )
        fresh: list[dict[str, Any]] = []
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
                {
                    "image_id": image_id,
                    "node_id": self.node_id,
                    "size": stat.st_size,
                    "hits": int(entry["hits"] or 0),
                    "last_accessed": to_datetime(accessed),
                    "last_modified": to_datetime(modified),
                    "checksum": entry["checksum"],
                    "hash_algo": entry.get("hash_algo"),
                    "hash_value": entry.get("hash_value"),
                    "pinned": bool(entry.get("pinned") or False),
                }
            )
        if fresh:
            with self._write() as conn:
                for values in fresh:
                    # Racing another worker of this node importing the same file: keep theirs.
                    self._upsert_image(conn, values, keep=values.keys())
        return ImportResult(imported=len(fresh), already_present=already, missing_file=missing)

    # --- metadata hooks --------------------------------------------------------------------

    def _meta_commit(self, fill: Fill, size: int, now: float) -> None:
        stamp = to_datetime(now)
        with self._write() as conn:
            # An image deleted through any node after this fill began is not
            # kept: the deletion wins (its local half is FileBackedDriver.cancel_fill;
            # this is the other nodes'). Checked in the commit's own transaction.
            # Two nodes' clocks are compared, as _deleted_since_made does.
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

    def _forget_origin_fill(self, image_id: str) -> Any:
        return delete(origin_fills).where(
            origin_fills.c.image_id == image_id, origin_fills.c.node_id == self.node_id
        )

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
            select(*_IMAGE_COLUMNS)
            .where(cached_images.c.node_id == self.node_id)
            .order_by(cached_images.c.image_id)
        )
        with self._read() as conn:
            return [_row_to_image(row) for row in conn.execute(query)]

    def iter_sizes(self) -> Iterator[tuple[str, int]]:
        query = select(cached_images.c.image_id, cached_images.c.size).where(
            cached_images.c.node_id == self.node_id
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
        return ((str(i), int(size)) for i, size in rows)

    def get_cached_image(self, image_id: str) -> CachedImage | None:
        with self._read() as conn:
            row = conn.execute(select(*_IMAGE_COLUMNS).where(self._mine(image_id))).first()
        return _row_to_image(row) if row is not None else None

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


def _deleted_since_made() -> Any:
    """The row's image was marked deleted at or after its copy was made."""
    return exists().where(
        deleted_images.c.image_id == cached_images.c.image_id,
        deleted_images.c.deleted_at >= cached_images.c.last_modified,
    )


def _brief(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL or parameters."""
    cause = exc.__cause__ if isinstance(exc, CacheStoreError) and exc.__cause__ else exc
    orig = getattr(cause, "orig", None)
    text = str(orig if orig is not None else cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


__all__ = [
    "CentralDriver",
    "ImportResult",
    "NodeInfo",
    "NodeListing",
    "OriginClaim",
    "cached_images",
    "deleted_images",
    "make_engine",
    "metadata",
    "nodes",
    "origin_fills",
    "to_datetime",
    "to_epoch",
]
