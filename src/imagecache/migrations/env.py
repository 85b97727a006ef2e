"""Alembic's entry point; only ever run through ``imagecache.migrations.upgrade``.

The connection (already in a transaction, holding the migration lock) arrives
in ``config.attributes``; there is no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from imagecache.migrations import VERSION_TABLE


def _run() -> None:
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError("imagecache migrations run only via imagecache.migrations.upgrade()")
    context.configure(
        connection=connection,
        version_table=VERSION_TABLE,
        transactional_ddl=True,
        # One transaction for the whole upgrade: all of it or none of it.
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


_run()
