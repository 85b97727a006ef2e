"""Fresh databases for the central driver's tests: PostgreSQL at 127.0.0.1:5432, or SQLite.

Every PostgreSQL database made here is uniquely named (``imagecache_test_<hex>``)
and dropped afterwards, so runs on the same server (other engineers, CI) never
see each other's rows. When no PostgreSQL answers, the tests that need it skip
with a loud reason; DESIGN §11 says how to start it.

Registered as a pytest plugin in ``conftest.py``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import update

from imagecache import create_driver
from imagecache.drivers.central import CentralDriver, nodes
from imagecache.settings import Settings, load_settings

PG_HOST = os.environ.get("IMAGECACHE_TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("IMAGECACHE_TEST_PGPORT", "5432"))
PG_ADMIN_DB = os.environ.get("IMAGECACHE_TEST_PGDATABASE", "test")

_unreachable: str | None = None
_session_database: str | None = None


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, dbname=PG_ADMIN_DB, autocommit=True, connect_timeout=3
    )


def require_postgres() -> None:
    """Skip the calling test, loudly, when the PostgreSQL server cannot be reached."""
    global _unreachable
    if _unreachable is None:
        try:
            with _admin() as conn:
                conn.execute("SELECT 1")
            _unreachable = ""
        except psycopg.Error as exc:
            _unreachable = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    if _unreachable:
        pytest.skip(
            f"SKIPPED: no PostgreSQL at {PG_HOST}:{PG_PORT} ({_unreachable}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"
        )


def create_database() -> str:
    """Create an empty, uniquely named database; returns its name."""
    require_postgres()
    name = f"imagecache_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with _admin() as conn:
        # FORCE: a driver a failed test never closed must not keep the database alive.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_url(name: str) -> str:
    return f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/{name}"


def session_postgres_url() -> str:
    """One database for the whole run (the contract suite); dropped at the end of it.

    Tests sharing it stay apart because every test registers its own node URL
    and rows are keyed by node.
    """
    global _session_database
    if _session_database is None:
        _session_database = create_database()
    return postgres_url(_session_database)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _session_database
    if _session_database is not None:
        drop_database(_session_database)
        _session_database = None


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A database of its own for one test."""
    name = create_database()
    try:
        yield postgres_url(name)
    finally:
        drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def central_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh central database of each backend, for one test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'central.db'}"
        return
    name = create_database()
    try:
        yield postgres_url(name)
    finally:
        drop_database(name)


def unique_node_url() -> str:
    """A node URL no other test uses (nothing listens there: no sibling fills in drivers)."""
    return f"http://127.0.0.1:9/node-{uuid.uuid4().hex[:12]}"


def node_url_for(cache_dir: Path) -> str:
    """A node URL of its own for each cache directory, the same at every restart."""
    digest = hashlib.sha256(str(cache_dir.resolve()).encode()).hexdigest()[:12]
    return f"http://127.0.0.1:9/node-{digest}"


def central_settings(
    cache_dir: Path, database_url: str, node_url: str | None = None, **overrides: object
) -> Settings:
    """Settings of one central-driver node over ``cache_dir`` (created if missing)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    return load_settings(
        None,
        image_cache_dir=cache_dir,
        image_cache_driver="central",
        database_url=database_url,
        worker_self_reference_url=node_url or node_url_for(cache_dir),
        **overrides,
    )


# Nodes of one cluster for the driver-level tests (test_central_nodes, the
# cluster tests): each a real CentralDriver with its own directory, one database.
NodeFactory = Callable[..., CentralDriver]


@pytest.fixture
def make_node(central_db_url: str, tmp_path: Path) -> Iterator[NodeFactory]:
    """Start a node: its own cache directory (by name) and URL, the shared database."""
    started: list[CentralDriver] = []

    def make(name: str, url: str | None = None, **overrides: object) -> CentralDriver:
        settings = central_settings(
            tmp_path / name, central_db_url, url or f"http://127.0.0.1:9/{name}", **overrides
        )
        driver = create_driver(settings)
        assert isinstance(driver, CentralDriver)
        started.append(driver)
        return driver

    yield make
    for driver in started:
        driver.close()


def put(driver: CentralDriver, image_id: str, data: bytes = b"payload") -> None:
    with driver.open_for_write(image_id) as target:
        target.write(data)


def age_heartbeat(driver: CentralDriver, seconds: float) -> None:
    with driver.engine.begin() as conn:
        conn.execute(
            update(nodes)
            .where(nodes.c.id == driver.node_id)
            .values(heartbeat=datetime.now(UTC) - timedelta(seconds=seconds))
        )
