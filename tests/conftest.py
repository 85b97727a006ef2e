"""Fixtures shared by the whole suite.

Fixtures for real peers live in their own modules (registered below), each
skipping loudly when its peer cannot run here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.fill.hooks import NO_HOOKS, FillHooks
from imagecache.layout import CacheLayout
from imagecache.server.app import create_app
from imagecache.settings import Settings, load_settings
from server_helpers import ServeProcess

pytest_plugins: list[str] = ["driver_kinds"]
# Real peers, each in tests/peers/.
pytest_plugins += ["peers.cutter", "peers.glance", "peers.keystone", "peers.moto", "peers.origin"]
pytest_plugins += ["central_db"]  # fresh PostgreSQL/SQLite databases for the central driver
pytest_plugins += ["cluster_helpers"]  # real cluster nodes (serve processes) by name
pytest_plugins += ["preheat_helpers"]  # a service and a second node for the preheat routes
pytest_plugins += ["peers.mounts"]  # tiny tmpfs filesystems for disk-full and read-only faults
pytest_plugins += [
    "peers.wan"
]  # network namespaces, shaped veth links (tests/peers/relay.py: delay)
pytest_plugins += ["peers.pgns"]  # a PostgreSQL of its own in a rig namespace (after peers.wan)


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


ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], http_origin: Any
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    """An in-process service in front of the ``http_origin`` peer; settings as keywords.

    Shared by the fill tests (test_fills, test_range_fills, test_fill_segments);
    a module with its own ``make_client`` fixture shadows this one.
    """

    async def make(fill_hooks: FillHooks = NO_HOOKS, **overrides: Any) -> TestClient[Any, Any]:
        settings = make_settings(upstream="http:" + http_origin.template, **overrides)
        return await aiohttp_client(create_app(settings, fill_hooks=fill_hooks))

    return make


@pytest.fixture
def gate_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every id the image-id gate (``CacheLayout.validate``) checks from now on, in order."""
    calls: list[object] = []
    gate = CacheLayout.validate

    def counting_gate(layout: CacheLayout, image_id: object) -> str:
        calls.append(image_id)
        return gate(layout, image_id)

    monkeypatch.setattr(CacheLayout, "validate", counting_gate)
    return calls
