"""Faults of the cache's own disk, on real filesystems: full, truncated, read-only.

The rule under test (DESIGN §4): a failure on the cache side never fails a
download. The cache directory is a real tmpfs of a few MiB (``small_tmpfs``),
so every ``ENOSPC``/``EROFS`` here comes from the kernel, at whatever step of
a fill it happens to strike.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from driver_kinds import settings_for
from imagecache.cache import ImageCache
from imagecache.server.app import create_app
from imagecache.server.state import STATE
from imagecache.settings import load_settings
from peers.mounts import break_into_read_only, fill_up
from server_helpers import image_bytes, listdir, poll, settled

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
MiB = 1024 * 1024


async def _fills_done(client: TestClient[Any, Any]) -> None:
    """Wait until the app has no flight left (each ends with its task)."""
    fills = client.app[STATE].fills
    await poll(lambda: _no_flight(fills), "every fill has ended")
    gc.collect()  # an unretrieved task error is reported when the task is collected


async def _no_flight(fills: Any) -> bool:
    return fills.current("img") is None


@pytest.fixture
def make_client(
    aiohttp_client: ClientFactory, http_origin: Any
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    async def make(cache_dir: Path, **overrides: Any) -> TestClient[Any, Any]:
        overrides.setdefault("free_space_watermark", 0)
        settings = load_settings(
            None, image_cache_dir=cache_dir, upstream="http:" + http_origin.template, **overrides
        )
        return await aiohttp_client(create_app(settings))

    return make


async def test_a_miss_larger_than_the_free_disk_is_streamed_whole(
    make_client: Any, http_origin: Any, small_tmpfs: Any
) -> None:
    cache_dir = small_tmpfs(size=2 * MiB)
    data = image_bytes(5 * MiB, seed=7)
    http_origin.add("big", data)
    client = await make_client(cache_dir)
    async with client.get("/v2/images/big/file") as response:
        assert response.status == 200
        assert await response.read() == data
    await settled(client)
    assert not (cache_dir / "big").exists()


async def test_a_miss_on_a_full_disk_is_streamed_whole(
    make_client: Any, http_origin: Any, small_tmpfs: Any
) -> None:
    cache_dir = small_tmpfs(size=4 * MiB)
    data = image_bytes(1 * MiB + 3, seed=8)
    http_origin.add("img", data)
    client = await make_client(cache_dir)
    fill_up(cache_dir)
    for _ in range(3):
        async with client.get("/v2/images/img/file") as response:
            assert response.status == 200, await response.text()
            assert await response.read() == data
    metrics = await (await client.get("/metrics")).text()
    assert 'imagecache_bypasses_total{reason="cache_failed"} 3.0' in metrics


async def test_a_fill_of_unknown_size_that_fills_the_disk_streams_on(
    make_client: Any, http_origin: Any, small_tmpfs: Any
) -> None:
    cache_dir = small_tmpfs(size=2 * MiB)
    data = image_bytes(5 * MiB, seed=9)
    http_origin.add("chunked", data, chunked=True)
    client = await make_client(cache_dir)
    async with client.get("/v2/images/chunked/file") as response:
        assert response.status == 200
        assert "Content-Length" not in response.headers
        assert await response.read() == data
    await settled(client)
    assert not (cache_dir / "chunked").exists()


@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "unknown_size"])
async def test_a_miss_on_a_cache_turned_read_only_is_streamed_whole(
    make_client: Any, http_origin: Any, small_ext4: Any, chunked: bool
) -> None:
    """Read-only strikes before the fill's file exists: at the reservation (a known
    size takes the capacity lock) or at the open of ``incomplete/`` (unknown size)."""
    cache_dir = small_ext4()
    data = image_bytes(MiB + 11, seed=10)
    http_origin.add("img", data, chunked=chunked)
    client = await make_client(cache_dir)
    break_into_read_only(cache_dir)
    for _ in range(2):
        async with client.get("/v2/images/img/file") as response:
            assert response.status == 200, await response.text()
            assert await response.read() == data
    assert not (cache_dir / "img").exists()
    # Said as what it is, at once: not a fill that failed and was retried.
    metrics = await (await client.get("/metrics")).text()
    assert 'imagecache_bypasses_total{reason="cache_unavailable"} 2.0' in metrics


@pytest.mark.parametrize("kind", ["sqlite", "xattr", "central-sqlite"])
async def test_a_cached_file_cut_short_is_quarantined_and_served_whole_from_the_origin(
    aiohttp_client: ClientFactory, http_origin: Any, tmp_path: Path, kind: str
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    settings = settings_for(kind, cache_dir, tmp_path).replace(
        upstream="http:" + http_origin.template, free_space_watermark=0
    )
    data = image_bytes(MiB + 17, seed=11)
    http_origin.add("img", data)
    client = await aiohttp_client(create_app(settings))
    async with client.get("/v2/images/img/file") as response:
        etag = response.headers["ETag"]
        assert await response.read() == data
    await settled(client)
    os.truncate(cache_dir / "img", 1000)  # what a full disk or an operator's copy leaves
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        assert response.headers["ETag"] == etag
        assert response.content_length == len(data)
        assert await response.read() == data
    await settled(client)
    assert (cache_dir / "invalid" / "img").stat().st_size == 1000
    assert http_origin.body_reads("img") == 2
    # Refilled: the next request is a hit of the whole image.
    assert (cache_dir / "img").read_bytes() == data


# Runs in a child process: it spends every descriptor it may have, which the
# test process (pytest, its event loop) must not.
_COMMIT_OUT_OF_DESCRIPTORS = """
import json, os, resource, sys
from imagecache.cache import ImageCache
from imagecache.settings import load_settings

cache = ImageCache(load_settings(None, image_cache_dir=sys.argv[1]))
# Few descriptors, so spending them is quick (the sqlite driver has its own open).
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
hogs = []
error = None
try:
    with cache.driver.open_for_write("img") as fill:
        fill.write(b"x" * 100_000)
        # From here on no descriptor is free: the commit's fsync, rename and
        # directory fsync run with none to spare, as under a descriptor leak.
        try:
            while True:
                hogs.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            pass
except OSError as exc:
    error = str(exc)
for fd in hogs:
    os.close(fd)
print(json.dumps({"error": error}))
"""


def test_a_commit_that_fails_out_of_descriptors_leaves_no_committed_file(
    tmp_path: Path,
) -> None:
    cache_dir = tmp_path / "cache"
    child = subprocess.run(
        [sys.executable, "-c", _COMMIT_OUT_OF_DESCRIPTORS, os.fspath(cache_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome = json.loads(child.stdout.splitlines()[-1])
    assert "Too many open files" in (outcome["error"] or ""), child.stderr
    assert not (cache_dir / "img").exists(), "a failed commit left its file in place"
    assert listdir(cache_dir / "invalid") == ["img"]
    assert listdir(cache_dir / "incomplete") == []
    # Reopened, nothing is adopted (no entry without a hash or an ETag).
    with ImageCache(load_settings(None, image_cache_dir=cache_dir)) as cache:
        assert cache.get_cached_images() == []
        assert not cache.is_cached("img")


async def test_a_cache_entry_deleted_during_its_fill_is_not_kept_and_its_client_gets_every_byte(
    make_client: Any, http_origin: Any, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    data = image_bytes(2 * MiB + 5, seed=12)
    http_origin.add("img", data)
    gate = http_origin.gate("img", after=MiB)
    client = await make_client(cache_dir)
    async with client.get("/v2/images/img/file") as response:
        first = await response.content.readany()
        assert first
        async with client.delete("/v2/cache/img") as deleted:
            assert deleted.status == 204
        gate.set()
        assert first + await response.read() == data
    await settled(client)
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "invalid") == ["img"]
    async with client.get("/v2/cache") as listing:
        assert (await listing.json())["cached_images"] == []
    # The next download fills it again.
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == data
    await settled(client)
    assert (cache_dir / "img").read_bytes() == data


async def test_management_calls_on_a_read_only_cache_say_what_failed(
    make_client: Any, http_origin: Any, small_ext4: Any
) -> None:
    cache_dir = small_ext4()
    data = image_bytes(100_000, seed=13)
    http_origin.add("img", data)
    http_origin.add("other", data)
    client = await make_client(cache_dir)
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == data
    await settled(client)
    break_into_read_only(cache_dir)
    calls = [
        ("PUT", "/v2/cache/other", {}),
        ("DELETE", "/v2/cache/img", {}),
        ("DELETE", "/v2/cache", {}),
        ("POST", "/v2/cache/clean", {}),
        ("POST", "/v2/cache/prune", {}),
        ("PUT", "/v2/cache/img/pin", {}),
    ]
    for method, path, headers in calls:
        async with client.request(method, path, headers=headers) as response:
            text = await response.text()
            assert response.status == 503, (method, path, response.status, text)
            assert f"the cache directory {cache_dir} is on a read-only file system" in text, text
    # Reading still works, and says what it has.
    async with client.get("/v2/cache") as response:
        assert response.status == 200
        assert [image["image_id"] for image in (await response.json())["cached_images"]] == ["img"]


@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "unknown_size"])
async def test_a_cache_turned_read_only_mid_fill_still_gives_its_client_every_byte(
    make_client: Any,
    http_origin: Any,
    small_ext4: Any,
    chunked: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The fill's writes fail mid-body, and so does its rollback (a rename on a
    read-only disk): neither is the client's problem."""
    cache_dir = small_ext4()
    data = image_bytes(3 * MiB + 1, seed=14)
    http_origin.add("img", data, chunked=chunked)
    gate = http_origin.gate("img", after=MiB)
    client = await make_client(cache_dir)
    async with client.get("/v2/images/img/file") as response:
        first = await response.content.readany()
        assert first
        break_into_read_only(cache_dir)
        gate.set()
        assert first + await response.read() == data
    await settled(client)
    assert not (cache_dir / "img").exists()
    # Ended cleanly: releasing its reservation on the read-only disk did not
    # escape the fill's task either.
    await _fills_done(client)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_a_commit_whose_fsync_fails_still_gives_its_client_every_byte(
    make_client: Any, http_origin: Any, small_ext4: Any
) -> None:
    """Every byte is written, then the disk turns read-only before the fill ends:
    the first step to fail is the commit's fsync."""
    cache_dir = small_ext4()
    data = image_bytes(MiB + 9, seed=15)
    http_origin.add("img", data, chunked=True)
    gate = http_origin.gate("img", after=len(data))  # holds only the terminating chunk
    client = await make_client(cache_dir)
    async with client.get("/v2/images/img/file") as response:
        received = bytearray()
        while len(received) < len(data):
            chunk = await response.content.readany()
            assert chunk
            received += chunk
        break_into_read_only(cache_dir)
        gate.set()
        assert bytes(received) + await response.read() == data
    await settled(client)
    assert not (cache_dir / "img").exists()
    async with client.get("/v2/cache") as listing:
        assert (await listing.json())["cached_images"] == []


async def test_a_range_on_a_full_disk_is_streamed_as_the_range(
    make_client: Any, http_origin: Any, small_tmpfs: Any
) -> None:
    """The bypass after failed fills keeps the Range: a 206 of the slice, not a 200 of it all.

    The WAN soak's [central] variant met a range answered 200 with the whole
    image there (``fill_retries``); ``cache_failed`` took the same path.
    """
    cache_dir = small_tmpfs(size=4 * MiB)
    data = image_bytes(1 * MiB + 3, seed=8)
    http_origin.add("img", data)
    client = await make_client(cache_dir)
    fill_up(cache_dir)
    for first, last in ((100, 4195), (len(data) - 19_268, len(data) - 1)):
        headers = {"Range": f"bytes={first}-{last}"}
        async with client.get("/v2/images/img/file", headers=headers) as response:
            assert response.status == 206, (response.status, response.headers)
            assert response.headers["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
            assert await response.read() == data[first : last + 1]
    await _fills_done(client)
