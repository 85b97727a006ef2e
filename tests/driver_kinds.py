"""Every driver kind the contract suites run against, and how to configure each.

Add a kind by appending its name to ``DRIVER_KINDS`` and teaching
``settings_for`` to build its settings. A kind whose prerequisite is missing on
this machine (a filesystem without user xattrs, no PostgreSQL) calls
``pytest.skip`` with the reason, so the skip is loud in the summary and the
other kinds still run.

Registered as a pytest plugin in ``conftest.py``, so the ``driver_kind`` fixture
is available to every test module.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from imagecache.settings import Settings, load_settings

DRIVER_KINDS = ["sqlite", "xattr", "central-sqlite", "central-postgres"]


def _require_user_xattrs(directory: Path) -> None:
    probe = directory / ".xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.imagecache.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            pytest.skip(f"SKIPPED xattr driver: {directory} has no user extended attributes")
        raise
    finally:
        probe.unlink(missing_ok=True)


def settings_for(kind: str, cache_dir: Path, tmp_path: Path) -> Settings:
    """Settings that make ``create_driver`` build a driver of ``kind`` over ``cache_dir``.

    ``tmp_path`` is private scratch space for kinds that need more than the cache
    directory (a database file, for example).
    """
    if kind == "sqlite":
        return load_settings(None, image_cache_dir=cache_dir, image_cache_driver="sqlite")
    if kind == "xattr":
        _require_user_xattrs(cache_dir)
        return load_settings(None, image_cache_dir=cache_dir, image_cache_driver="xattr")
    if kind in ("central-sqlite", "central-postgres"):
        # Imported here: only the central kinds need a database.
        from central_db import central_settings, session_postgres_url

        database_url = (
            f"sqlite:///{tmp_path / 'central.db'}"
            if kind == "central-sqlite"
            else session_postgres_url()  # skips loudly when PostgreSQL is down
        )
        return central_settings(cache_dir, database_url)
    raise ValueError(f"unknown driver kind {kind!r}; add it to tests/driver_kinds.py")


@pytest.fixture(params=DRIVER_KINDS)
def driver_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind
