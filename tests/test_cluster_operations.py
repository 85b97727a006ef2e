"""Cluster-wide listing, in process: two service apps over one central database.

Each app is a real node of the service (its own cache directory, its own
central driver) answering on a real loopback socket; they share a fresh
database of each backend (``central_db_url``). A third node that stopped
beating is a bare driver with an aged heartbeat, as a crashed node leaves it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from central_db import age_heartbeat, central_settings, put
from imagecache import ImageCache, create_driver
from imagecache.cli import main
from imagecache.client import ServiceError, fan_out, queue_on_nodes
from imagecache.drivers.central import CentralDriver
from imagecache.errors import ConfigurationError
from imagecache.settings import Settings, load_settings
from server_helpers import directory_app, image_bytes, put_image, settled

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
TOKEN = "cluster-admin-token"
ADMIN = {"X-Auth-Token": TOKEN}
DATA = image_bytes(150_000, seed=5)


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    for name in ("a", "b"):
        put_image(root, name, DATA)
    return root


def node_settings(tmp_path: Path, db_url: str, name: str, **overrides: object) -> Settings:
    return central_settings(
        tmp_path / name, db_url, f"http://127.0.0.1:9/{name}", admin_token=TOKEN, **overrides
    )


async def fill(client: TestClient[Any, Any], image_id: str) -> None:
    async with client.get(f"/v2/images/{image_id}/file") as response:
        assert response.status == 200, await response.text()
        assert await response.read() == DATA
    await settled(client)


async def test_all_nodes_lists_every_node_with_its_copies(
    aiohttp_client: ClientFactory, central_db_url: str, tmp_path: Path, origin: Path
) -> None:
    one = await aiohttp_client(
        directory_app(node_settings(tmp_path, central_db_url, "one"), origin)
    )
    two = await aiohttp_client(
        directory_app(node_settings(tmp_path, central_db_url, "two"), origin)
    )
    gone = create_driver(node_settings(tmp_path, central_db_url, "gone"))
    assert isinstance(gone, CentralDriver)
    try:
        put(gone, "a")
        age_heartbeat(gone, gone.config.node_dead_after + 1)
        await fill(one, "a")
        await fill(two, "a")
        await fill(two, "b")

        async with one.get("/v2/cache", params={"all_nodes": "true"}, headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
    finally:
        gone.close()

    # Glance's keys are this node's own, unchanged.
    assert [entry["image_id"] for entry in body["cached_images"]] == ["a"]
    assert body["queued_images"] == []
    cluster = body["cluster"]
    assert sorted(cluster) == [
        "http://127.0.0.1:9/gone",
        "http://127.0.0.1:9/one",
        "http://127.0.0.1:9/two",
    ]
    assert cluster["http://127.0.0.1:9/one"]["alive"] is True
    assert [i["image_id"] for i in cluster["http://127.0.0.1:9/one"]["cached_images"]] == ["a"]
    assert [i["image_id"] for i in cluster["http://127.0.0.1:9/two"]["cached_images"]] == [
        "a",
        "b",
    ]
    assert {i["size"] for i in cluster["http://127.0.0.1:9/two"]["cached_images"]} == {len(DATA)}
    # A dead node is listed as dead, its copies not offered.
    assert cluster["http://127.0.0.1:9/gone"]["alive"] is False
    assert cluster["http://127.0.0.1:9/gone"]["cached_images"] == []

    # Without the flag the answer is Glance's, with no cluster key.
    async with two.get("/v2/cache", headers=ADMIN) as response:
        plain = await response.json()
    assert "cluster" not in plain
    assert [entry["image_id"] for entry in plain["cached_images"]] == ["a", "b"]

    async with two.get("/v2/cache", params={"all_nodes": "maybe"}, headers=ADMIN) as response:
        assert response.status == 400
        assert "all_nodes" in await response.text()
    async with two.get("/v2/cache", params={"all_nodes": "true"}) as response:
        assert response.status == 403  # the admin check comes first, as everywhere in /v2/cache


async def test_all_nodes_is_409_without_cluster_mode(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin: Path
) -> None:
    client = await aiohttp_client(directory_app(make_settings(admin_token=TOKEN), origin))
    async with client.get("/v2/cache", params={"all_nodes": "true"}, headers=ADMIN) as response:
        assert response.status == 409
        assert "centralized caching is not enabled" in await response.text()
    async with client.get("/v2/cache", params={"all_nodes": "false"}, headers=ADMIN) as response:
        assert response.status == 200


def _settings_file(path: Path, settings: Settings) -> Path:
    path.write_text(
        f'image_cache_dir = "{settings.image_cache_dir}"\n'
        'image_cache_driver = "central"\n'
        f'database_url = "{settings.database_url}"\n'
        f'worker_self_reference_url = "{settings.worker_self_reference_url}"\n'
    )
    return path


async def test_cli_all_nodes_local_and_remote(
    aiohttp_client: ClientFactory, central_db_url: str, tmp_path: Path, origin: Path
) -> None:
    one_settings = node_settings(tmp_path, central_db_url, "one", site="dc-1")
    one = await aiohttp_client(directory_app(one_settings, origin))
    two = await aiohttp_client(
        directory_app(node_settings(tmp_path, central_db_url, "two"), origin)
    )
    await fill(one, "a")
    await fill(two, "b")
    runner = CliRunner()

    # Remote: the API of node two.
    url = str(two.make_url("")).rstrip("/")
    remote = await asyncio.to_thread(
        runner.invoke, main, ["--url", url, "--token", TOKEN, "list-cached", "--all-nodes"]
    )
    assert remote.exit_code == 0, remote.output
    lines = remote.output.splitlines()
    assert lines[0].split()[:4] == ["Node", "Site", "State", "ID"]
    assert any(
        line.split()[:4] == ["http://127.0.0.1:9/one", "dc-1", "live", "a"] for line in lines
    )
    # No site label: a "-" of its own, so the columns stay aligned.
    assert any(line.split()[:4] == ["http://127.0.0.1:9/two", "-", "live", "b"] for line in lines)

    remote_json = await asyncio.to_thread(
        runner.invoke,
        main,
        ["--url", url, "--token", TOKEN, "--json", "list-cached", "--all-nodes"],
    )
    assert remote_json.exit_code == 0, remote_json.output
    answer = json.loads(remote_json.output)
    assert {u: [i["image_id"] for i in n["cached_images"]] for u, n in answer.items()} == {
        "http://127.0.0.1:9/one": ["a"],
        "http://127.0.0.1:9/two": ["b"],
    }
    assert {u: n["site"] for u, n in answer.items()} == {
        "http://127.0.0.1:9/one": "dc-1",
        "http://127.0.0.1:9/two": "",
    }

    # Local: straight from the database, with node one's own settings (run on
    # its host, the CLI is that node: same directory, same URL).
    config = _settings_file(tmp_path / "one.toml", one_settings)
    local = await asyncio.to_thread(
        runner.invoke, main, ["--config", str(config), "--json", "list-cached", "--all-nodes"]
    )
    assert local.exit_code == 0, local.output
    assert {u: [i["image_id"] for i in n["cached_images"]] for u, n in answer.items()} == {
        u: [i["image_id"] for i in n["cached_images"]] for u, n in json.loads(local.output).items()
    }


def test_cli_all_nodes_without_cluster_mode_is_a_clear_error(tmp_path: Path) -> None:
    ImageCache(load_settings(None, image_cache_dir=tmp_path / "cache")).close()  # a sqlite cache
    result = CliRunner().invoke(
        main, ["--cache-dir", str(tmp_path / "cache"), "list-cached", "--all-nodes"]
    )
    assert result.exit_code == 1
    assert "needs cluster mode" in result.output


def test_fan_out_keeps_at_most_k_calls_in_flight_and_reports_each() -> None:
    """Real threads; each call waits at a barrier of K, so K must run at once and no more."""
    concurrency, total = 3, 7
    lock = threading.Lock()
    in_flight = peak = 0
    barrier = threading.Barrier(concurrency, timeout=10)

    def call(n: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            if n < 2 * concurrency:  # two full rounds meet at the barrier; the last runs alone
                barrier.wait()
            if n == 4:
                raise ServiceError("node four is down")
            return n * 10
        finally:
            with lock:
                in_flight -= 1

    results = fan_out(list(range(total)), call, concurrency)
    assert peak == concurrency
    assert [r if isinstance(r, int) else str(r) for r in results] == [
        0,
        10,
        20,
        30,
        "node four is down",
        50,
        60,
    ]
    with pytest.raises(ConfigurationError, match="at least 1"):
        fan_out([1], call, 0)


def test_queue_on_nodes_refuses_a_bad_url_before_asking_anyone() -> None:
    with pytest.raises(ConfigurationError, match="http"):
        queue_on_nodes("img", ["http://127.0.0.1:9", "ftp://elsewhere"], None, 2)
