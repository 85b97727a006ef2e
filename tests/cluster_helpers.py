"""Real cluster nodes: ``imagecache serve`` processes over one PostgreSQL and the http origin.

Each node is a process of its own with its own cache directory, on a free
loopback port that is also its ``worker_self_reference_url`` (its identity,
so the port is picked before it starts rather than by the server); all share
the test's fresh PostgreSQL database (``central_db``) and the counting
``http_origin`` peer. The ``cluster_node`` fixture (registered in
``conftest.py``) starts them by name and stops them after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peers import free_port
from server_helpers import ServeProcess, image_bytes, start_serve

SIZE = 4 * 1024 * 1024 + 321
DATA = image_bytes(SIZE, seed=11)
HALF = SIZE // 2
TOKEN = "cluster-secret-for-tests"
DEADLINE = 20.0  # how long a cluster-wide effect (a deletion, a heartbeat) may take to show

StartNode = Callable[..., Awaitable[ServeProcess]]


def node_env(database_url: str, port: int, **settings: str) -> dict[str, str]:
    """The environment of a node on ``port``: central driver, its URL, quick heartbeats."""
    return {
        "IMAGECACHE_IMAGE_CACHE_DRIVER": "central",
        "IMAGECACHE_DATABASE_URL": database_url,
        "IMAGECACHE_WORKER_SELF_REFERENCE_URL": f"http://127.0.0.1:{port}",
        "IMAGECACHE_CLUSTER_TOKEN": TOKEN,
        "IMAGECACHE_NODE_HEARTBEAT_INTERVAL": "0.2",
        "IMAGECACHE_NODE_DEAD_AFTER": "5",
        **settings,
    }


@pytest.fixture
async def cluster_node(
    fresh_postgres_url: str, http_origin: Any, tmp_path: Path
) -> AsyncIterator[StartNode]:
    """``await cluster_node(name, site=None, cross_site=False, **env)``: a running node.

    The same name again restarts that node on its directory and port.
    ``site``/``cross_site`` set its site; other keywords are more
    environment (``IMAGECACHE_UPSTREAM_TIMEOUT="5"``).
    """
    ports: dict[str, int] = {}
    running: list[ServeProcess] = []

    async def start(
        name: str, site: str | None = None, *, cross_site: bool = False, **env: str
    ) -> ServeProcess:
        port = ports.setdefault(name, free_port())
        cache_dir = tmp_path / name
        cache_dir.mkdir(exist_ok=True)
        if site is not None:
            env["IMAGECACHE_SITE"] = site
            env["IMAGECACHE_SIBLING_CROSS_SITE"] = "true" if cross_site else "false"
        served = await start_serve(
            cache_dir,
            "http:" + http_origin.template,
            port=port,
            env=node_env(fresh_postgres_url, port, **env),
        )
        running.append(served)
        return served

    yield start
    for served in running:
        await served.stop(grace=40)


async def download(session: aiohttp.ClientSession, node: ServeProcess, image_id: str) -> bytes:
    """The image's body from ``node`` (200 asserted), once the node has committed it."""
    async with session.get(f"{node.url}/v2/images/{image_id}/file") as response:
        assert response.status == 200, await response.text()
        body = await response.read()
    await settle(session, node)
    return body


async def settle(session: aiohttp.ClientSession, node: ServeProcess) -> None:
    """Let the node commit what it has verified (its cache API waits for that first)."""
    async with session.get(f"{node.url}/v2/cache") as response:
        assert response.status == 200, await response.text()


async def holders(session: aiohttp.ClientSession, node: ServeProcess, image_id: str) -> list[str]:
    """The node URLs that hold ``image_id``, as ``node`` tells them."""
    async with session.get(f"{node.url}/v2/cache/nodes/{image_id}") as response:
        assert response.status == 200, await response.text()
        found: list[str] = await response.json()
        return found
