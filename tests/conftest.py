"""Fixtures shared by the whole suite.

Fixtures for real peers live in their own modules (registered below), each
skipping loudly when its peer cannot run here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from imagecache.settings import Settings, load_settings
from server_helpers import ServeProcess

pytest_plugins: list[str] = ["driver_kinds"]
# Real peers, each in tests/peers/.
pytest_plugins += ["peers.cutter", "peers.glance", "peers.keystone", "peers.moto", "peers.origin"]
pytest_plugins += ["central_db"]  # fresh PostgreSQL/SQLite databases for the central driver
pytest_plugins += ["peers.mounts"]  # tiny tmpfs filesystems for disk-full and read-only faults
pytest_plugins += [
    "peers.wan"
]  # network namespaces, shaped veth links (tests/peers/relay.py: delay)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def make_settings(cache_dir: Path) -> Callable[..., Settings]:
    """Settings for a test: a private cache directory plus any overrides."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("image_cache_dir", cache_dir)
        return load_settings(None, **overrides)

    return make


@pytest.fixture
async def servers() -> AsyncIterator[list[ServeProcess]]:
    """``imagecache serve`` processes a test starts (``start_serve``); stopped at its end."""
    started: list[ServeProcess] = []
    yield started
    for server in started:
        await server.stop()
