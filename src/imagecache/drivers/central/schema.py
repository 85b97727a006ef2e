"""The cluster database: its tables at head, the engine, and the one way to use them.

SQLAlchemy Core over PostgreSQL (psycopg 3) in production, SQLite for a
single-machine trial and the tests. The migrations in ``imagecache/migrations``
create the schema; the ``Table`` objects here describe it for queries.

Times are ``DateTime(timezone=True)`` columns written as aware UTC values and
read back as epoch seconds, whatever the host's or the session's time zone
(Glance's central driver stores naive values and reads them as local time).
SQLite keeps no zone, so a naive value read back is UTC by construction.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    exists,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError

from imagecache.drivers.files import FileBackedDriver
from imagecache.errors import BadDriverConfiguration, CacheStoreError, CentralUnavailable
from imagecache.records import CachedImage

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
    Column("site", String(63), nullable=False, server_default=""),
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

# One row per image and site some node of that site is reading from the origin
# now (see OriginClaim); site '' is "no site".
origin_fills = Table(
    "origin_fills",
    metadata,
    Column("image_id", String(255), primary_key=True),
    Column("site", String(63), primary_key=True, server_default=""),
    Column("node_id", Integer, ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    Column("started", DateTime(timezone=True), nullable=False),
)

# Preheat jobs (drivers/central/preheat.py): what was asked, and one item per
# node and image that the node runs itself and writes the outcome of.
preheat_jobs = Table(
    "preheat_jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(2048), nullable=False),
    Column("images", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("state", String(16), nullable=False),
)

preheat_items = Table(
    "preheat_items",
    metadata,
    Column(
        "job_id",
        Integer,
        ForeignKey("preheat_jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("node_id", Integer, ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("image_id", String(255), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("reason", Text),
    Column("bytes", BigInteger),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_preheat_items_node_state", "node_id", "state"),
)

# First key of the two-key advisory locks that guard origin reads, one lock per
# image (second key: hashtext of the id); the two-key space never meets the
# single bigint key of the migration lock.
ORIGIN_LOCK_SPACE = 0x1AC0

IMAGE_COLUMNS = (
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


def row_to_image(row: Sequence[Any]) -> CachedImage:
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


def make_engine(database_url: str, timeout: float = 10.0) -> Engine:
    """An engine for ``database_url``; BadDriverConfiguration if it cannot be one.

    ``timeout`` bounds a connection attempt to PostgreSQL (``connect_timeout``)
    and how long sent data may stay unacknowledged (``tcp_user_timeout``):
    with the database's host cut off, a statement fails within it instead of
    waiting for the kernel's retransmissions (about 15 minutes), and the node
    goes on from its local records (``outbox.py``). A statement sent and
    acknowledged before the cut leaves nothing unacknowledged while it waits
    for its answer, so the user timeout never starts; TCP keepalives after
    ``timeout`` of silence give it a probe to time out on (without them the
    wait lasted until the link came back: tests/wan/test_wan_database.py).
    """
    try:
        url = make_url(database_url)
        if url.get_backend_name() == "postgresql":
            if url.drivername == "postgresql":
                # Plain "postgresql://" would pick psycopg2, which we do not ship.
                url = url.set(drivername="postgresql+psycopg")
            engine = create_engine(
                url,
                pool_size=4,
                max_overflow=8,
                pool_pre_ping=True,
                pool_recycle=1800,
                pool_timeout=timeout,
                connect_args={
                    "connect_timeout": max(1, round(timeout)),
                    "tcp_user_timeout": max(1, round(timeout * 1000)),
                    "keepalives": 1,
                    "keepalives_idle": max(1, round(timeout)),
                    "keepalives_interval": 1,
                    "keepalives_count": 3,
                },
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


def deleted_since_made() -> Any:
    """The row's image was marked deleted at or after its copy was made."""
    return exists().where(
        deleted_images.c.image_id == cached_images.c.image_id,
        deleted_images.c.deleted_at >= cached_images.c.last_modified,
    )


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the cluster database failing (not the local disk or a refusal)."""
    return isinstance(exc, CentralUnavailable) or (
        isinstance(exc, CacheStoreError) and isinstance(exc.__cause__, SQLAlchemyError)
    )


def brief(exc: BaseException) -> str:
    """A one-line description of a database error, without SQL or parameters."""
    cause = exc.__cause__ if isinstance(exc, CacheStoreError) and exc.__cause__ else exc
    orig = getattr(cause, "orig", None)
    text = str(orig if orig is not None else cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


class CentralStore(FileBackedDriver):
    """What every part of the central driver shares: the engine and this node's id.

    The parts (nodes, claims, deletions, the importer) are mixins over this
    class, each in its own module, and ``CentralDriver`` is their sum: one
    object, as the driver contract wants, whose concepts live apart.
    """

    node_id: int
    self_url: str
    instance_id: str
    engine: Engine
    _beat_lock: threading.Lock
    _left: bool
    _registered: bool

    def _require_online(self, what: str) -> None:
        """Fail at once (CentralUnavailable) while the database is known away; see outbox.py."""

    def _went_offline(self, exc: BaseException) -> None:
        """Note that the database failed; see outbox.py."""

    def push(self, image_ids: list[str]) -> None:
        """Write these images' local rows to the database now, if it answers; see outbox.py."""

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One write transaction; database errors become CacheStoreError."""
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(imagecache_write=True)
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            if not isinstance(exc, IntegrityError):  # a lost race is an answer, not an absence
                self._went_offline(exc)
            raise CacheStoreError(f"central metadata: {brief(exc)}") from exc

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            if not isinstance(exc, IntegrityError):  # a lost race is an answer, not an absence
                self._went_offline(exc)
            raise CacheStoreError(f"central metadata: {brief(exc)}") from exc

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
