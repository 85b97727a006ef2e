"""The central driver without its database: shared by the loopback and the WAN rig tests.

tests/drivers/test_central_autonomy.py cuts the database with the relay's
black hole on loopback; tests/wan/test_wan_database.py cuts a veth link to a
PostgreSQL in a rig namespace. Both run ``partition_story`` (a node cut from
its database serves, fills, reports it, and rejoins; a deletion made by a
node on the database's side meanwhile is applied) with their own cut.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import event, select

from central_db import central_settings
from imagecache.drivers.central import CentralDriver, cached_images, make_engine
from imagecache.server.state import STATE
from imagecache.settings import Settings
from server_helpers import image_bytes, poll, put_image, settled

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
DATA = {name: image_bytes(200_000 + i, seed=20 + i) for i, name in enumerate("abcd")}
TOKEN = "cluster-token-of-the-autonomy-tests"


def node_settings(tmp_path: Path, url: str, name: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "cluster_token": TOKEN,
        "database_timeout": 1.0,
        "node_heartbeat_interval": 0.2,
        "free_space_watermark": 0,
    }
    values.update(overrides)
    return central_settings(tmp_path / name, url, f"http://127.0.0.1:9/{name}", **values)


def count_statements(driver: CentralDriver) -> list[str]:
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        seen.append(statement)

    event.listen(driver.engine, "before_cursor_execute", note)
    return seen


def central_rows(url: str, node_id: int) -> dict[str, tuple[int, int]]:
    """``{image_id: (size, hits)}`` of one node's rows, read by a connection of our own."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(cached_images.c.image_id, cached_images.c.size, cached_images.c.hits).where(
                    cached_images.c.node_id == node_id
                )
            ).all()
    finally:
        engine.dispose()
    return {image_id: (int(size), int(hits)) for image_id, size, hits in rows}


def on_disk(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in cache_dir.iterdir() if p.name in DATA}


async def download(client: TestClient[Any, Any], image_id: str) -> None:
    async with client.get(f"/v2/images/{image_id}/file") as response:
        assert response.status == 200, await response.text()
        assert await response.read() == DATA[image_id]


async def gauge(client: TestClient[Any, Any], name: str) -> float:
    async with client.get("/metrics") as response:
        text = await response.text()
    [value] = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def node_driver(client: TestClient[Any, Any]) -> CentralDriver:
    driver = client.app[STATE].cache.central
    assert driver is not None
    return driver


async def true(value: bool) -> bool:
    return value


def make_origin(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    for name, data in DATA.items():
        put_image(root, name, data)
    return root


def put(driver: CentralDriver, image_id: str) -> None:
    with driver.open_for_write(image_id) as target:
        target.write(DATA[image_id])


async def partition_story(
    client: TestClient[Any, Any],
    other: CentralDriver,
    *,
    cut: Callable[[], None],
    restore: Callable[[], None],
    database_url: str,
    while_cut: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """A node (``client``, cut by ``cut``) and ``other``, a node that keeps its database.

    ``database_url`` reads the central rows by a way that is never cut;
    ``while_cut`` runs once the node knows it is away (the rig waits there
    until the node is dead for the cluster). Ends with the link restored.
    """
    driver = node_driver(client)
    cache_dir = driver.config.image_cache_dir
    assert cache_dir is not None
    try:
        for name in ("a", "c"):
            await download(client, name)
        await settled(client)
        assert other.get_cached_nodes("c") == [driver.self_url]

        cut()
        await download(client, "a")  # a hit: 200, every byte
        await download(client, "b")  # a miss: from the origin, and kept
        await settled(client)
        assert driver.get_cached_image("b") is not None
        await poll(lambda: true(driver.offline), "the node knows its database is away")
        async with client.get("/healthcheck/ready") as response:
            assert response.status == 503
            checks = (await response.json())["checks"]
        assert not checks["database"]["ok"]
        assert "does not answer" in checks["database"]["detail"]
        assert "queued locally (outbox)" in checks["database"]["detail"]
        assert driver.mirror.depth() >= 1  # b, and a's hit

        async def metrics_say_away() -> bool:
            return (
                await gauge(client, "imagecache_cluster_database_up") == 0
                and await gauge(client, "imagecache_cluster_outbox_images") >= 1
            )

        await poll(metrics_say_away, "the metrics show the database away and the queue")
        if while_cut is not None:
            await while_cut()
        other.delete_everywhere("c")  # through the other node (it holds none), during the cut
        await download(client, "a")  # still served

        restore()
        await poll(
            lambda: true(not driver.offline and driver.mirror.depth() == 0),
            "the node is back and its outbox drained",
        )
        await poll(lambda: true(not driver.is_cached("c")), "the deletion made meanwhile applied")
        async with client.get("/healthcheck/ready") as response:
            assert response.status == 200, await response.text()

        async def metrics_say_back() -> bool:
            return (
                await gauge(client, "imagecache_cluster_database_up") == 1
                and await gauge(client, "imagecache_cluster_outbox_images") == 0
            )

        await poll(metrics_say_back, "the metrics show the database back and the queue empty")

        disk = on_disk(cache_dir)
        assert disk == {"a": len(DATA["a"]), "b": len(DATA["b"])}
        rows = central_rows(database_url, driver.node_id)
        assert {i: size for i, (size, _) in rows.items()} == disk  # the map is the disk
        hits = driver.get_hit_count("a")
        assert hits == 2  # the two hits (the first download was the miss)

        async def hits_arrived() -> bool:
            return central_rows(database_url, driver.node_id)["a"][1] == hits

        await poll(hits_arrived, "the hits of the cut reach the database, each counted once")
        assert other.get_cached_nodes("b") == [driver.self_url]  # filled during the cut
        assert other.get_cached_nodes("c") == []
    finally:
        restore()  # again, harmless: a failure half-way must not leave the cut
