"""``/v2/cache`` and the legacy routes: Glance's status codes, bodies and policy order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.server.auth import AdminDecision, decide_admin
from imagecache.server.cache_api import WORKER
from imagecache.settings import Settings
from server_helpers import directory_app, image_bytes, listdir, put_image, settled

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
TOKEN = "s3cret-admin-token"
ADMIN = {"X-Auth-Token": TOKEN}
DATA = image_bytes(200_000)


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    for name in ("a", "b", "c"):
        put_image(root, name, DATA)
    return root


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin_root: Path
) -> TestClient[Any, Any]:
    return await aiohttp_client(directory_app(make_settings(admin_token=TOKEN), origin_root))


async def fill(client: TestClient[Any, Any], *names: str) -> None:
    for name in names:
        async with client.get(f"/v2/images/{name}/file") as response:
            assert response.status == 200
            assert await response.read() == DATA
    await settled(client)


async def state_of(client: TestClient[Any, Any]) -> dict[str, Any]:
    async with client.get("/v2/cache", headers=ADMIN) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def test_listing_has_glance_fields(client: TestClient[Any, Any]) -> None:
    state = await state_of(client)
    assert (state["cached_images"], state["queued_images"]) == ([], [])
    await fill(client, "a")
    (entry,) = (await state_of(client))["cached_images"]
    assert {"image_id", "hits", "last_accessed", "last_modified", "size"} <= set(entry)
    assert (entry["image_id"], entry["size"], entry["hits"]) == ("a", len(DATA), 0)


async def test_put_queues_and_fetches_now(client: TestClient[Any, Any], cache_dir: Path) -> None:
    async with client.put("/v2/cache/b", headers=ADMIN) as response:
        assert response.status == 202
    await client.app[WORKER].join()
    assert (cache_dir / "b").read_bytes() == DATA
    state = await state_of(client)
    assert [entry["image_id"] for entry in state["cached_images"]] == ["b"]
    assert state["queued_images"] == [], "the marker goes when the fill commits"


async def test_put_unknown_image_is_404_and_worker_survives_failures(
    client: TestClient[Any, Any], cache_dir: Path, origin_root: Path
) -> None:
    async with client.put("/v2/cache/missing", headers=ADMIN) as response:
        assert response.status == 404
    # A fetch that fails inside the worker (the file vanished after the PUT
    # looked it up) is logged; the next one still works.
    (origin_root / "c.sha256").write_text("0" * 64)  # c now fails verification
    async with client.put("/v2/cache/c", headers=ADMIN) as response:
        assert response.status == 202
    await client.app[WORKER].join()
    assert listdir(cache_dir / "invalid") == ["c"]
    async with client.put("/v2/cache/a", headers=ADMIN) as response:
        assert response.status == 202
    await client.app[WORKER].join()
    assert (cache_dir / "a").exists()


async def test_delete_entry(client: TestClient[Any, Any], cache_dir: Path) -> None:
    await fill(client, "a")
    async with client.delete("/v2/cache/a", headers=ADMIN) as response:
        assert response.status == 204
    assert not (cache_dir / "a").exists()
    async with client.delete("/v2/cache/b", headers=ADMIN) as response:
        assert response.status == 204  # known upstream, nothing cached: still 204
    async with client.delete("/v2/cache/never-heard-of", headers=ADMIN) as response:
        assert response.status == 404


@pytest.mark.parametrize(
    ("target", "cached_left", "queued_left"),
    [(None, 0, 0), ("", 0, 0), ("cache", 0, 1), ("queue", 1, 0), ("CACHE", 0, 1)],
)
async def test_clear_target_header(
    client: TestClient[Any, Any], target: str | None, cached_left: int, queued_left: int
) -> None:
    await fill(client, "a")
    await client.app[WORKER].stop()  # keep the queued image queued
    async with client.put("/v2/cache/b", headers=ADMIN) as response:
        assert response.status == 202
    headers = dict(ADMIN)
    if target is not None:
        headers["x-image-cache-clear-target"] = target
    async with client.delete("/v2/cache", headers=headers) as response:
        assert response.status == 204
    state = await state_of(client)
    assert (len(state["cached_images"]), len(state["queued_images"])) == (cached_left, queued_left)


@pytest.mark.parametrize("target", ["both", "all", "caches"])
async def test_clear_target_other_values_are_400(
    client: TestClient[Any, Any], cache_dir: Path, target: str
) -> None:
    await fill(client, "a")
    headers = {**ADMIN, "x-image-cache-clear-target": target}
    async with client.delete("/v2/cache", headers=headers) as response:
        assert response.status == 400
        assert "x-image-cache-clear-target" in await response.text()
    assert (cache_dir / "a").exists(), "a refused clear changes nothing"


async def test_clean_and_prune(client: TestClient[Any, Any], cache_dir: Path) -> None:
    await fill(client, "a", "b")
    (cache_dir / "invalid" / "junk").write_bytes(b"x")
    async with client.post("/v2/cache/clean", headers=ADMIN) as response:
        assert response.status == 200
    assert listdir(cache_dir / "invalid") == []
    async with client.post("/v2/cache/prune", headers=ADMIN) as response:
        assert response.status == 200
        assert await response.json() == {"total_files_pruned": 0, "total_bytes_pruned": 0}


async def test_prune_evicts_above_the_limit(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin_root: Path
) -> None:
    settings = make_settings(
        admin_token=TOKEN, image_cache_max_size=len(DATA) * 3 // 2, max_image_fraction=1.0
    )
    client = await aiohttp_client(directory_app(settings, origin_root))
    await fill(client, "a")
    await fill(client, "b")
    async with client.post("/v2/cache/prune", headers=ADMIN) as response:
        body = await response.json()
    # The capacity manager may already have evicted on the way in; either way
    # the cache ends within its limit and prune reports what it removed.
    assert body["total_files_pruned"] * len(DATA) == body["total_bytes_pruned"]
    assert len((await state_of(client))["cached_images"]) == 1


async def test_nodes_is_409_without_cluster_mode(client: TestClient[Any, Any]) -> None:
    async with client.get("/v2/cache/nodes/a", headers=ADMIN) as response:
        assert response.status == 409
    async with client.get("/v2/cache/nodes/a?details=true", headers=ADMIN) as response:
        assert response.status == 409
    async with client.get("/v2/cache/nodes/a?details=maybe", headers=ADMIN) as response:
        assert response.status == 400


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/v2/cache", "DELETE, GET"),
        ("POST", "/v2/cache", "DELETE, GET"),
        ("GET", "/v2/cache/a", "DELETE, PUT"),
        ("GET", "/v2/cache/clean", "POST"),
        ("DELETE", "/v2/cache/prune", "POST"),
    ],
)
async def test_other_methods_are_405_with_allow(
    client: TestClient[Any, Any], method: str, path: str, allow: str
) -> None:
    async with client.request(method, path, headers=ADMIN) as response:
        assert response.status == 405
        allowed = {method.strip() for method in response.headers["Allow"].split(",")}
        assert allowed == set(allow.split(", "))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/cache"),
        ("DELETE", "/v2/cache"),
        ("PUT", "/v2/cache/a"),
        ("DELETE", "/v2/cache/a"),
        ("POST", "/v2/cache/clean"),
        ("POST", "/v2/cache/prune"),
        ("GET", "/v2/cache/nodes/a"),
        ("PATCH", "/v2/cache"),  # policy before the method: 403, not 405
        ("PUT", "/v2/cache/..bad"),  # policy before the id: 403, not 400
        ("GET", "/v2/cached_images"),
        ("DELETE", "/v2/queued_images"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong-token", TOKEN[:-1], TOKEN + "x"])
async def test_without_the_admin_token_everything_is_403(
    client: TestClient[Any, Any], cache_dir: Path, method: str, path: str, token: str | None
) -> None:
    await fill(client, "a")
    headers = {"X-Auth-Token": token} if token is not None else {}
    async with client.request(method, path, headers=headers) as response:
        assert response.status == 403
    assert (cache_dir / "a").exists()


async def test_legacy_routes(client: TestClient[Any, Any], cache_dir: Path) -> None:
    await fill(client, "a", "b")
    async with client.get("/v2/cached_images", headers=ADMIN) as response:
        assert response.status == 200
        ids = [entry["image_id"] for entry in (await response.json())["cached_images"]]
        assert ids == ["a", "b"]
    async with client.put("/v2/queued_images/c", headers=ADMIN) as response:
        assert response.status == 200
    async with client.get("/v2/queued_images", headers=ADMIN) as response:
        assert await response.json() == {"queued_images": ["c"]}
    async with client.delete("/v2/cached_images/a", headers=ADMIN) as response:
        assert response.status == 200
    async with client.delete("/v2/cached_images", headers=ADMIN) as response:
        assert await response.json() == {"num_deleted": 1}
    async with client.delete("/v2/queued_images", headers=ADMIN) as response:
        assert await response.json() == {"num_deleted": 1}
    assert listdir(cache_dir / "queue") == []


def test_admin_decisions(make_settings: Callable[..., Settings]) -> None:
    """Decided from the settings, the headers and the peer address; not over a socket,
    because a test client cannot connect from a non-loopback address."""
    bare = make_settings()
    assert decide_admin(bare, {}, "127.0.0.1") is AdminDecision.LOOPBACK_OK
    assert decide_admin(bare, {}, "::1") is AdminDecision.LOOPBACK_OK
    assert decide_admin(bare, {}, "10.0.0.5") is AdminDecision.NOT_LOOPBACK
    assert decide_admin(bare, {}, None) is AdminDecision.NOT_LOOPBACK
    assert decide_admin(bare, {"X-Roles": "admin"}, "10.0.0.5") is AdminDecision.NOT_LOOPBACK

    token = make_settings(admin_token=TOKEN)
    assert decide_admin(token, {"X-Auth-Token": TOKEN}, "10.0.0.5") is AdminDecision.TOKEN_OK
    assert decide_admin(token, {}, "127.0.0.1") is AdminDecision.TOKEN_WRONG  # no loopback pass

    roles = make_settings(trust_identity_headers=True)
    assert decide_admin(roles, {"X-Roles": "member, Admin"}, "10.0.0.5") is AdminDecision.ROLE_OK
    assert decide_admin(roles, {"X-Roles": "member"}, "127.0.0.1") is AdminDecision.NOT_ADMIN


async def test_without_configuration_loopback_callers_are_admin(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin_root: Path
) -> None:
    client = await aiohttp_client(directory_app(make_settings(), origin_root))
    async with client.get("/v2/cache") as response:
        assert response.status == 200
