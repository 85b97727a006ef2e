"""The central database's schema, as Alembic migrations shipped inside the package.

They run programmatically (``upgrade``) when a central driver is configured, so
``pip install imagecache`` is all an operator needs; there is no ``alembic.ini``.
Several nodes starting at once serialise on a lock (a PostgreSQL advisory lock,
or SQLite's write lock) so only one of them upgrades and the others find the
schema already at head.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

# Our own name for Alembic's bookkeeping table, so the database can be shared
# with other applications that use Alembic too.
VERSION_TABLE = "imagecache_alembic_version"
# An arbitrary, fixed 64-bit key for pg_advisory_xact_lock: "imagecache schema".
MIGRATION_LOCK_KEY = 0x1A6E_CAC7_E5C7_0001

_HERE = Path(__file__).resolve().parent


def alembic_config(connection: Connection) -> Config:
    """An Alembic configuration that runs our scripts on ``connection``."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this imagecache knows."""
    script = ScriptDirectory(str(_HERE))
    head = script.get_current_head()
    assert head is not None, "the migrations directory has no revisions"
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at, or None for an empty database."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` inside the connection's transaction, under a lock.

    The caller owns the transaction (``engine.begin()``): on PostgreSQL DDL is
    transactional, so a failed upgrade leaves the previous schema intact, and
    the transaction-scoped advisory lock is released at commit.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    command.upgrade(alembic_config(connection), revision)


__all__ = ["VERSION_TABLE", "current_revision", "head_revision", "upgrade"]
