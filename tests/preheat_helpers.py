"""A service in this process for the preheat routes' tests, and a second node beside it.

The service runs over a directory origin, its cache central on a fresh
PostgreSQL database (``central_db``), at site "near"; the other "node" is a
driver registered in the same database at site "far", which is all the routes
see of it (nothing runs its items: a test claims and finishes them through
it, as that node's service would). Registered as a pytest plugin in
``conftest.py``; the fixtures are named ``preheat_*`` so that no test's own
``client`` is shadowed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from central_db import central_settings
from imagecache import create_driver
from imagecache.drivers.central import CentralDriver
from server_helpers import directory_app, image_bytes, put_image

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
TOKEN = "preheat-admin-token"
ADMIN = {"X-Auth-Token": TOKEN}
DATA = image_bytes(300_000, seed=5)
SELF = "http://127.0.0.1:9/self"


@pytest.fixture
def preheat_origin(tmp_path: Path) -> Path:
    """A directory origin with images "a" and "b"."""
    root = tmp_path / "origin"
    for name in ("a", "b"):
        put_image(root, name, DATA)
    return root


@pytest.fixture
def other_node(fresh_postgres_url: str, tmp_path: Path) -> Iterator[CentralDriver]:
    """A second node of the cluster, at site "far" (registered; nothing runs its items)."""
    driver = create_driver(
        central_settings(tmp_path / "other", fresh_postgres_url, "http://127.0.0.1:9/o", site="far")
    )
    assert isinstance(driver, CentralDriver)
    yield driver
    driver.close()


@pytest.fixture
def lone_node(central_db_url: str, tmp_path: Path) -> Iterator[CentralDriver]:
    """One node alone in a fresh central database of each backend (its driver only)."""
    settings = central_settings(tmp_path / "node", central_db_url, "http://127.0.0.1:9/node")
    driver = create_driver(settings)
    assert isinstance(driver, CentralDriver)
    yield driver
    driver.close()


@pytest.fixture
async def preheat_client(
    aiohttp_client: ClientFactory,
    fresh_postgres_url: str,
    preheat_origin: Path,
    tmp_path: Path,
    other_node: CentralDriver,
) -> TestClient[Any, Any]:
    settings = central_settings(
        tmp_path / "self",
        fresh_postgres_url,
        SELF,
        admin_token=TOKEN,
        site="near",
        node_heartbeat_interval=0.2,
    )
    return await aiohttp_client(directory_app(settings, preheat_origin))


async def post(client: TestClient[Any, Any], body: Any, headers: Any = ADMIN) -> tuple[int, Any]:
    """POST a job: the status, and the answer (JSON for a 202, else the text)."""
    async with client.post("/v2/cache/preheat", json=body, headers=headers) as response:
        text = await response.text()
        return response.status, (await response.json() if response.status == 202 else text)


async def job(client: TestClient[Any, Any], job_id: int) -> dict[str, Any]:
    """GET a job, which must be there (200)."""
    async with client.get(f"/v2/cache/preheat/{job_id}", headers=ADMIN) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body
