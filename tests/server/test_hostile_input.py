"""What a hostile caller or a tampered cache directory tries: links, dot segments, deep JSON."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from imagecache.cache import ImageCache
from imagecache.errors import ImageNotCached
from imagecache.server.app import create_app
from imagecache.settings import Settings
from server_helpers import directory_app, image_bytes, put_image, settled

DATA = image_bytes(50_000, seed=5)
SECRET = b"root:x:0:0:root:/root:/bin/bash\n"


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    put_image(root, "img", DATA)
    return root


@pytest.fixture
async def client(
    aiohttp_client: Any, make_settings: Callable[..., Settings], origin_root: Path
) -> TestClient[Any, Any]:
    return await aiohttp_client(directory_app(make_settings(), origin_root))  # type: ignore[no-any-return]


async def _get(client: TestClient[Any, Any], path: str) -> tuple[int, bytes]:
    async with client.get(path) as response:
        return response.status, await response.read()


@pytest.mark.parametrize("planted", ["symlink", "fifo"])
async def test_a_planted_entry_in_the_cache_directory_is_never_served(
    client: TestClient[Any, Any], cache_dir: Path, tmp_path: Path, planted: str
) -> None:
    assert await _get(client, "/v2/images/img/file") == (200, DATA)
    await settled(client)
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET)
    entry = cache_dir / "img"
    entry.unlink()
    if planted == "symlink":
        entry.symlink_to(secret)
    else:
        os.mkfifo(entry)  # opened for reading, a FIFO without a writer would hang a hit
    # Served from the origin instead, and the planted entry moved aside (the link
    # itself, not what it points to).
    assert await _get(client, "/v2/images/img/file") == (200, DATA)
    await settled(client)
    assert secret.read_bytes() == SECRET
    assert (cache_dir / "invalid" / "img").is_symlink() == (planted == "symlink")
    assert entry.is_file()
    assert not entry.is_symlink()
    assert entry.read_bytes() == DATA
    assert await _get(client, "/v2/images/img/file") == (200, DATA)


def test_the_library_read_refuses_a_symlinked_entry(
    make_settings: Callable[..., Settings], cache_dir: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET)
    cache = ImageCache(make_settings())
    try:
        (cache_dir / "img").symlink_to(secret)
        with pytest.raises(ImageNotCached), cache.open_for_read("img"):
            pass
        assert (cache_dir / "invalid" / "img").is_symlink()
        assert not (cache_dir / "img").exists()
    finally:
        cache.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v2/%2e%2e/versions",
        "/v2/%2E%2E/versions",
        "/v2/images/%2e%2e/%2e%2e/versions",
        "/v2/./images",
        "/v2/images/a%2Fb",
        "/v2/images/a%5c..%5cb",
        "/v2//images",
    ],
)
async def test_a_path_that_normalises_elsewhere_is_not_relayed(
    aiohttp_server: Any, make_settings: Callable[..., Settings], path: str
) -> None:
    seen: list[str] = []

    async def origin_handler(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return web.json_response({"versions": []})

    origin_app = web.Application()
    origin_app.router.add_route("*", "/{tail:.*}", origin_handler)
    origin = await aiohttp_server(origin_app)
    settings = make_settings(upstream=f"glance:{str(origin.make_url('')).rstrip('/')}")
    proxy = TestServer(create_app(settings))
    await proxy.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = URL(str(proxy.make_url("")).rstrip("/") + path, encoded=True)
            async with session.get(url) as response:
                body = await response.text()
                assert response.status == 400, body
                assert "not relayed" in body
            async with session.get(proxy.make_url("/v2/images")) as response:
                assert response.status == 200
    finally:
        await proxy.close()
    assert seen == ["/v2/images"]


async def test_deeply_nested_json_to_a_management_route_is_a_400(
    client: TestClient[Any, Any],
) -> None:
    for body in ("[" * 100_000, '{"a":' * 50_000):
        async with client.post("/v2/cache/verify", data=body) as response:
            assert response.status == 400, await response.text()
            assert "nested too deeply" in await response.text()
