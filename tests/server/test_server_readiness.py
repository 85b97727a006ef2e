"""``GET /healthcheck/ready``: every check, passing and failing, against real parts.

``/healthcheck`` is liveness and answers OK whatever the origin does; the
readiness answer names the part that fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.server.app import create_app
from imagecache.settings import Settings
from peers import free_port
from peers.mounts import break_into_read_only

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


async def _ready(client: TestClient[Any, Any]) -> tuple[int, dict[str, Any]]:
    async with client.get("/healthcheck/ready") as response:
        return response.status, await response.json()


def _failing(body: dict[str, Any]) -> dict[str, str]:
    return {name: check["detail"] for name, check in body["checks"].items() if not check["ok"]}


async def test_all_good_is_200_with_every_check_named(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    (tmp_path / "images").mkdir()
    settings = make_settings(upstream=f"directory:{tmp_path / 'images'}", free_space_watermark=0)
    client = await aiohttp_client(create_app(settings))
    status, body = await _ready(client)
    assert status == 200
    assert body["ready"] is True
    assert set(body["checks"]) == {"origin", "cache_dir", "free_space"}
    assert _failing(body) == {}


async def test_a_directory_origin_that_does_not_exist_is_not_ready(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-images"
    settings = make_settings(upstream=f"directory:{missing}", free_space_watermark=0)
    client = await aiohttp_client(create_app(settings))
    async with client.get("/healthcheck") as response:
        assert response.status == 200  # liveness: the process answers
    status, body = await _ready(client)
    assert status == 503
    assert body["ready"] is False
    failing = _failing(body)
    assert list(failing) == ["origin"]
    assert str(missing) in failing["origin"]


async def test_a_glance_origin_that_is_down_is_not_ready(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    # A loopback port nobody listens on: connections are refused, as by a stopped Glance.
    url = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(upstream=f"glance:{url}", free_space_watermark=0, upstream_timeout=5)
    client = await aiohttp_client(create_app(settings))
    status, body = await _ready(client)
    assert status == 503
    failing = _failing(body)
    assert list(failing) == ["origin"]
    assert url in failing["origin"]
    assert "does not answer" in failing["origin"]


@pytest.mark.glance
async def test_a_glance_origin_that_answers_is_ready(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], glance_peer: Any
) -> None:
    settings = make_settings(upstream=f"glance:{glance_peer.url}", free_space_watermark=0)
    client = await aiohttp_client(create_app(settings))
    status, body = await _ready(client)
    assert (status, _failing(body)) == (200, {})


async def test_a_cache_directory_turned_read_only_is_not_ready(
    aiohttp_client: ClientFactory, small_ext4: Any, tmp_path: Path
) -> None:
    from imagecache.settings import load_settings

    cache_dir = small_ext4()
    (tmp_path / "images").mkdir()
    settings = load_settings(
        None,
        image_cache_dir=cache_dir,
        upstream=f"directory:{tmp_path / 'images'}",
        free_space_watermark=0,
    )
    client = await aiohttp_client(create_app(settings))
    assert (await _ready(client))[0] == 200
    break_into_read_only(cache_dir)
    status, body = await _ready(client)
    assert status == 503
    failing = _failing(body)
    assert list(failing) == ["cache_dir"]
    assert str(cache_dir) in failing["cache_dir"]
    assert "Read-only file system" in failing["cache_dir"]


async def test_free_space_below_the_watermark_is_not_ready(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    (tmp_path / "images").mkdir()
    settings = make_settings(
        upstream=f"directory:{tmp_path / 'images'}", free_space_watermark=1 << 60
    )
    client = await aiohttp_client(create_app(settings))
    status, body = await _ready(client)
    assert status == 503
    assert list(_failing(body)) == ["free_space"]
    assert "free_space_watermark" in body["checks"]["free_space"]["detail"]


async def test_cluster_mode_checks_its_database(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    from central_db import central_settings

    (tmp_path / "images").mkdir()
    settings = central_settings(
        tmp_path / "cache",
        f"sqlite:///{tmp_path / 'central.db'}",
        upstream=f"directory:{tmp_path / 'images'}",
        free_space_watermark=0,
        node_heartbeat_interval=0.2,  # its thread stops within one interval
    )
    client = await aiohttp_client(create_app(settings))
    status, body = await _ready(client)
    assert status == 200
    assert body["checks"]["database"] == {"ok": True, "detail": "the central database answers"}


@pytest.mark.postgres
async def test_a_central_database_that_is_gone_is_not_ready(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    from central_db import central_settings, create_database, drop_database, postgres_url

    (tmp_path / "images").mkdir()
    name = create_database()  # skips loudly when PostgreSQL is down
    try:
        settings = central_settings(
            tmp_path / "cache",
            postgres_url(name),
            upstream=f"directory:{tmp_path / 'images'}",
            free_space_watermark=0,
            node_heartbeat_interval=0.2,
        )
        client = await aiohttp_client(create_app(settings))
        assert (await _ready(client))[0] == 200
        # Dropped under the running service (its connections terminated): as a
        # database server that went away.
        drop_database(name)
        status, body = await _ready(client)
        assert status == 503
        failing = _failing(body)
        assert list(failing) == ["database"]
        assert failing["database"].startswith("the central database does not answer")
    finally:
        drop_database(name)
