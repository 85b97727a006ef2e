"""Image data through the service: hits, misses, ranges, HEAD, conditionals, failures."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.errors import CacheStoreError
from imagecache.server.state import STATE
from imagecache.settings import Settings
from polling import eventually
from server_helpers import (
    HeldHooks,
    directory_app,
    filled,
    image_bytes,
    listdir,
    put_image,
    settled,
)

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]

SIZE = 3 * 1024 * 1024 + 17
DATA = image_bytes(SIZE)


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    put_image(root, "img-1", DATA)
    return root


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin_root: Path
) -> TestClient[Any, Any]:
    return await aiohttp_client(directory_app(make_settings(), origin_root))


async def get(client: TestClient[Any, Any], path: str, **headers: str) -> tuple[int, Any, bytes]:
    async with client.get(path, headers=headers) as response:
        return response.status, response.headers, await response.read()


async def test_miss_then_hit_serve_identical_correct_bytes(
    client: TestClient[Any, Any], cache_dir: Path
) -> None:
    status, headers, body = await get(client, "/v2/images/img-1/file")
    assert status == 200
    assert body == DATA
    assert int(headers["Content-Length"]) == SIZE
    miss_etag = headers["ETag"]
    await settled(client)
    assert (cache_dir / "img-1").read_bytes() == DATA

    status, headers, body = await get(client, "/v2/images/img-1/file")
    assert status == 200
    assert body == DATA
    assert headers["ETag"] == miss_etag == f'"sha256-{hashlib.sha256(DATA).hexdigest()}"'
    assert int(headers["Content-Length"]) == SIZE
    assert client.app[STATE].cache.get_hit_count("img-1") == 1


async def test_a_hit_is_counted_before_its_client_has_the_bytes(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow metadata store (a busy central database, say): the client that
    # holds its last byte must still find its hit counted.
    await get(client, "/v2/images/img-1/file")
    await settled(client)
    driver = client.app[STATE].cache.driver
    record_hit = driver.record_hit

    def slow_record_hit(image_id: str) -> None:
        time.sleep(0.3)
        record_hit(image_id)

    monkeypatch.setattr(driver, "record_hit", slow_record_hit)
    status, _, body = await get(client, "/v2/images/img-1/file")
    assert status == 200
    assert body == DATA
    assert client.app[STATE].cache.get_hit_count("img-1") == 1


async def test_a_hit_that_cannot_be_counted_is_still_served(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    await get(client, "/v2/images/img-1/file")
    await settled(client)

    def failing_record_hit(image_id: str) -> None:
        raise CacheStoreError("the metadata store is down")

    monkeypatch.setattr(client.app[STATE].cache.driver, "record_hit", failing_record_hit)
    status, _, body = await get(client, "/v2/images/img-1/file")
    assert status == 200
    assert body == DATA
    assert "recording a hit of img-1 failed: the metadata store is down" in caplog.text


async def test_one_hit_checks_its_image_id_once(
    client: TestClient[Any, Any], request: pytest.FixtureRequest
) -> None:
    # DESIGN.md §2: validated once, at the edge. The route's gate makes an
    # ImageId, which the facade, the driver and the layout take as checked
    # (the old code checked the id of one hit five times).
    await get(client, "/v2/images/img-1/file")
    await settled(client)
    checked: list[object] = request.getfixturevalue("gate_calls")  # counted from here on
    status, headers, body = await get(client, "/v2/images/img-1/file")
    assert (status, body) == (200, DATA)
    assert headers["Cache-Status"].endswith("; hit")
    assert checked == ["img-1"]
    assert client.app[STATE].cache.get_hit_count("img-1") == 1  # the hit was counted


async def test_content_md5_is_the_hex_checksum_like_glance(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    root = tmp_path / "md5origin"
    put_image(root, "m", DATA, sidecar="md5")
    client = await aiohttp_client(directory_app(make_settings(), root))
    md5 = hashlib.md5(DATA).hexdigest()
    for _ in range(2):  # miss, then hit
        status, headers, body = await get(client, "/v2/images/m/file")
        assert (status, body) == (200, DATA)
        assert headers["Content-MD5"] == md5


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-0", 0, 1),  # first byte
        (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE),  # last byte
        ("bytes=-100", SIZE - 100, SIZE),  # suffix
        ("bytes=1000-", 1000, SIZE),  # open-ended
        (f"bytes=10-{SIZE + 500}", 10, SIZE),  # last position clipped to the end
        ("bytes=-999999999", 0, SIZE),  # suffix longer than the image
    ],
)
async def test_single_ranges(
    client: TestClient[Any, Any], cache_dir: Path, cached: bool, header: str, start: int, end: int
) -> None:
    if cached:
        await get(client, "/v2/images/img-1/file")
    status, headers, body = await get(client, "/v2/images/img-1/file", Range=header)
    assert status == 206
    assert body == DATA[start:end]
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert int(headers["Content-Length"]) == end - start
    if not cached:
        # range_starts_fill (the default): the ranged miss filled the cache.
        await filled(client, "img-1")
        assert listdir(cache_dir / "incomplete") == []
        assert (cache_dir / "img-1").read_bytes() == DATA


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_size(
    client: TestClient[Any, Any], cached: bool, header: str
) -> None:
    if cached:
        await get(client, "/v2/images/img-1/file")
    status, headers, _ = await get(client, "/v2/images/img-1/file", Range=header)
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize(
    "header", ["bytes=5-2", "bytes=abc", "bytes=-", "bytes=1-2-3", "bytes 0-1", "bytes=0x10-"]
)
async def test_malformed_range_is_400(client: TestClient[Any, Any], header: str) -> None:
    status, _, body = await get(client, "/v2/images/img-1/file", Range=header)
    assert status == 400
    assert b"Range" in body


async def test_multiple_ranges_are_400_like_glance(client: TestClient[Any, Any]) -> None:
    await get(client, "/v2/images/img-1/file")
    status, _, body = await get(client, "/v2/images/img-1/file", Range="bytes=0-1,5-6")
    assert status == 400
    assert b"multiple ranges" in body


async def test_unknown_range_unit_is_ignored(client: TestClient[Any, Any]) -> None:
    status, _, body = await get(client, "/v2/images/img-1/file", Range="items=0-1")
    assert (status, body) == (200, DATA)


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
async def test_head_gives_headers_and_no_body(
    client: TestClient[Any, Any], cache_dir: Path, cached: bool
) -> None:
    if cached:
        await get(client, "/v2/images/img-1/file")
    async with client.head("/v2/images/img-1/file") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == SIZE
        assert response.headers["ETag"].startswith('"sha256-')
        assert await response.read() == b""
    if not cached:
        assert not (cache_dir / "img-1").exists(), "HEAD must not fill the cache"


@pytest.mark.parametrize("cached", [False, True], ids=["miss", "hit"])
async def test_if_none_match_gives_304(client: TestClient[Any, Any], cached: bool) -> None:
    _, headers, _ = await get(client, "/v2/images/img-1/file")
    etag = headers["ETag"]
    if not cached:
        await client.delete("/v2/cache/img-1")
    status, headers, body = await get(client, "/v2/images/img-1/file", **{"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert headers["ETag"] == etag
    status, _, _ = await get(client, "/v2/images/img-1/file", **{"If-None-Match": '"other"'})
    assert status == 200


async def test_if_range_with_another_etag_sends_the_whole_image(
    client: TestClient[Any, Any],
) -> None:
    await get(client, "/v2/images/img-1/file")
    headers = {"Range": "bytes=0-9", "If-Range": '"stale"'}
    status, _, body = await get(client, "/v2/images/img-1/file", **headers)
    assert (status, body) == (200, DATA)


async def test_unknown_image_is_404(client: TestClient[Any, Any]) -> None:
    status, _, _ = await get(client, "/v2/images/nope/file")
    assert status == 404


@pytest.mark.parametrize(
    "raw_id",
    ["..", ".hidden", "a" * 256, "%2e%2e", "a%2Fb", "incomplete", "-x", "a%00b"],
)
async def test_bad_image_ids_are_400_at_the_edge(
    client: TestClient[Any, Any], cache_dir: Path, raw_id: str
) -> None:
    url = client.make_url("/").with_path(f"/v2/images/{raw_id}/file", encoded=True)
    async with client.session.get(url) as response:
        # aiohttp's router may refuse a decoded "/" itself (404); never a 200 or a 5xx.
        assert response.status in (400, 404), (raw_id, response.status)
        if response.status == 404:
            assert "/" in raw_id.replace("%2F", "/")
    assert listdir(cache_dir / "incomplete") == []


async def test_checksum_mismatch_aborts_the_response_and_quarantines(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    cache_dir: Path,
) -> None:
    root = tmp_path / "bad"
    put_image(root, "bad", DATA)
    (root / "bad.sha256").write_text("0" * 64 + "\n")  # the origin promises other bytes
    client = await aiohttp_client(directory_app(make_settings(), root))
    async with client.get("/v2/images/bad/file") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert not (cache_dir / "bad").exists()
    assert listdir(cache_dir / "invalid") == ["bad"]
    assert listdir(cache_dir / "incomplete") == []


async def test_the_client_has_its_bytes_before_the_commit_and_a_request_meanwhile_is_a_hit(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    origin_root: Path,
    cache_dir: Path,
) -> None:
    """The last byte goes out once verified; a request arriving during the commit waits for it."""
    hooks = HeldHooks(hold="before_commit")
    client = await aiohttp_client(directory_app(make_settings(), origin_root, fill_hooks=hooks))
    state = client.app[STATE]
    try:
        # The whole body, verified, while the commit is held back.
        status, _, body = await get(client, "/v2/images/img-1/file")
        assert (status, body) == (200, DATA)
        # The commit's thread may start after the client has read its last
        # byte (seen under load): wait for it to reach the held point.
        await eventually(hooks.entered.is_set, "the commit reaches its held point")
        assert not (cache_dir / "img-1").exists()
        hooks.noted["joined"].clear()  # the first download's join; wait for the next
        again = asyncio.create_task(get(client, "/v2/images/img-1/file"))
        await asyncio.wait_for(hooks.noted["joined"].wait(), timeout=10)  # the committing fill
    finally:
        hooks.release.set()
    status, _, body = await again
    assert (status, body) == (200, DATA)
    registry = state.metrics.registry
    assert registry.get_sample_value("imagecache_misses_total") == 1
    assert registry.get_sample_value("imagecache_hits_total") == 1
    assert registry.get_sample_value("imagecache_fill_followers_total") in (None, 0)


async def test_a_commit_ending_between_lock_and_record_reads_keeps_the_etag(
    client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hit path reads the lock before the record: a writer records, then unlocks.

    The interleaving is forced: a "writer" holds the committed file's lock,
    and the hit's first record read sees no record (read before the commit
    wrote it) while the writer finishes at that moment. Read in the other
    order, the hit found no record and no lock and went out without its ETag.
    """
    _, headers, _ = await get(client, "/v2/images/img-1/file")
    etag = headers["ETag"]
    state = client.app[STATE]
    await settled(client)
    committed = state.cache.driver.layout.active_path("img-1")
    writer = committed.open("rb")  # its lock stands for a writer's
    fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
    real = state.cache.get_cached_image
    calls = 0

    def record_then_commit_ends(image_id: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            writer.close()  # the writer has recorded and unlocked, just after this read
            return None
        return real(image_id)

    monkeypatch.setattr(state.cache, "get_cached_image", record_then_commit_ends)
    try:
        status, headers, body = await get(
            client, "/v2/images/img-1/file", **{"If-None-Match": etag}
        )
    finally:
        writer.close()
    assert calls >= 2, "the hit must look at the record again once the writer is gone"
    assert (status, body) == (304, b"")
    assert headers["ETag"] == etag
