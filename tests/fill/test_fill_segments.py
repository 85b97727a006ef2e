"""Segmented fills (fill/segments.py): one image read over several ranged origin connections.

The origin is the ``http_origin`` peer (a real aiohttp server on loopback) that
answers ranges and counts requests and body bytes; the service is the real app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.fill import fill_config
from imagecache.fill.hooks import FillHooks
from imagecache.fill.segments import plan
from imagecache.fill.writer import FillWriter
from imagecache.server.cache_api import WORKER
from imagecache.server.state import STATE
from imagecache.settings import MiB, load_settings
from polling import eventually
from server_helpers import (
    ServeProcess,
    image_bytes,
    listdir,
    poll,
    settled,
    start_serve,
    streaming_herd,
)

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
# Eight segments of 1 MiB (the last 5 bytes short), over four connections.
SIZE = 8 * MiB - 5
DATA = image_bytes(SIZE, seed=15)
SEGMENTED = {"fill_segments": 4, "fill_segment_size": MiB}


def _open_under(directory: Path) -> list[str]:
    """What this process's open descriptors name under ``directory``."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(directory)):
                names.append(target)
    return names


def _gets(origin: Any) -> list[str | None]:
    """The Range header of every body GET the origin had, in arrival order."""
    return [headers.get("Range") for method, _, headers in origin.requests if method == "GET"]


def test_plan_cuts_large_images_only() -> None:
    config = fill_config(load_settings(None, **SEGMENTED))
    assert plan(SIZE, config).spans == [(i * MiB, min((i + 1) * MiB, SIZE)) for i in range(8)]
    assert plan(SIZE, config).connections == 4
    # Under twice a segment, or of no known size: one stream.
    assert plan(2 * MiB - 1, config).spans == [(0, None)]
    assert plan(None, config).single
    assert plan(SIZE, fill_config(load_settings(None))).single, "off by default"


async def test_a_segmented_fill_reads_each_range_once_four_at_a_time_and_commits_verified(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=0)
    client = await make_client(**SEGMENTED)

    async def download() -> bytes:
        async with client.get("/v2/images/img/file") as response:
            assert response.status == 200
            return await response.read()

    task = asyncio.create_task(download())
    # Four connections, each holding a segment at the gate: no fifth is asked for.
    await http_origin.wait_for_reads("img", 4)
    assert sorted(_gets(http_origin), key=str) == [
        "bytes=0-1048575",
        "bytes=1048576-2097151",
        "bytes=2097152-3145727",
        "bytes=3145728-4194303",
    ]
    gate.set()
    assert await task == DATA
    await settled(client)
    assert sorted(_gets(http_origin), key=str) == sorted(
        [f"bytes={i * MiB}-{min((i + 1) * MiB, SIZE) - 1}" for i in range(8)]
    )
    assert http_origin.bytes_sent("img") == SIZE, "each byte read from the origin once"
    # Committed (verified against the origin's Content-MD5) and now a hit.
    assert (cache_dir / "img").read_bytes() == DATA
    assert listdir(cache_dir / "incomplete") == []
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    assert len(_gets(http_origin)) == 8


async def test_followers_of_a_segmented_fill_get_the_exact_bytes(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    # Every body holds after its first 256 KiB until the clients are all in:
    # the later segments are still being fetched while the followers join.
    gate = http_origin.gate("img", after=256 * 1024)
    client = await make_client(**SEGMENTED)
    tasks = await streaming_herd(client, "/v2/images/img/file", 6)
    await http_origin.wait_for_reads("img", 4)
    gate.set()
    assert await asyncio.gather(*tasks) == [DATA] * 6
    assert len(_gets(http_origin)) == 8
    assert http_origin.bytes_sent("img") == SIZE
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA


async def test_a_failing_segment_fails_the_fill_and_caches_nothing(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    from peers.origin import Fault

    http_origin.add("img", DATA)
    # The sixth segment breaks after 1000 bytes; the others are whole.
    http_origin.fail("img", Fault.RESET, after=1000, start=5 * MiB)
    client = await make_client(upstream_resume_attempts=0, **SEGMENTED)
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert f"bytes={5 * MiB}-{6 * MiB - 1}" in _gets(http_origin)
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "incomplete") == []
    # Healthy again: the next request fills, segmented, and commits.
    http_origin.fail("img", None)
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA


async def test_the_fill_file_grows_only_as_a_contiguous_prefix(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Sibling processes follow a fill by its file's size: bytes ahead of a hole never show."""
    http_origin.add("img", DATA)
    held = 256 * 1024
    gate = http_origin.gate("img", after=held)
    client = await make_client(**SEGMENTED)
    registry = client.app[STATE].metrics.registry

    def read_from_origin() -> float:
        return registry.get_sample_value("imagecache_bytes_from_upstream_total") or 0.0

    async with client.get("/v2/images/img/file") as response:
        # Counted once written: segment 0 to the fill's file, the others to the scratch file.
        await eventually(
            lambda: read_from_origin() == 4 * held, "each segment has read its held bytes"
        )
        assert os.stat(cache_dir / "incomplete" / "img").st_size == held
        flight = client.app[STATE].fills.current("img")
        assert flight is not None
        assert flight.available == held
        gate.set()
        assert await response.read() == DATA
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA


class _ChangeTheTail(FillHooks):
    """Rewrites the origin's last MiB once the fill has the image's promised md5."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def deciding(self, image_id: str) -> None:
        self.path.write_bytes(DATA[: SIZE - MiB] + image_bytes(MiB, seed=16))


async def test_wrong_bytes_in_a_later_segment_fail_verification(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client(_ChangeTheTail(http_origin.root / "img"), **SEGMENTED)
    async with client.get("/v2/images/img/file") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert len(_gets(http_origin)) == 8
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "incomplete") == []
    assert listdir(cache_dir / "invalid") == ["img"]


async def test_an_image_without_a_promised_hash_is_one_stream(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Segments from two versions of a replaced image would be spliced unseen: not segmented."""
    http_origin.add("img", DATA, content_md5=False)
    client = await make_client(**SEGMENTED)
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    await settled(client)
    assert _gets(http_origin) == [None]
    assert (cache_dir / "img").read_bytes() == DATA


async def test_a_background_segmented_fill_keeps_all_its_connections_within_the_cap(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    token = "s3cret-admin-token"
    client = await make_client(
        admin_token=token,
        background_bandwidth="2MiB/s",
        background_bandwidth_while_busy="2MiB/s",
        **SEGMENTED,
    )
    registry = client.app[STATE].metrics.registry
    started = time.monotonic()
    async with client.put("/v2/cache/img", headers={"X-Auth-Token": token}) as response:
        assert response.status == 202
    await client.app[WORKER].join()
    elapsed = time.monotonic() - started
    assert (cache_dir / "img").read_bytes() == DATA
    assert len(_gets(http_origin)) == 8
    assert registry.get_sample_value("imagecache_background_bytes_total") == SIZE
    # Four connections share the one bucket: 8 MiB at 2 MiB/s, less the burst
    # (1 MiB) and a chunk of overdraw per connection, is still more than 2 s.
    assert elapsed >= 2.0, elapsed


async def test_shutdown_rolls_back_a_segmented_fill_and_releases_its_files(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=256 * 1024)  # every connection stalls
    client = await make_client(upstream_timeout=60, **SEGMENTED)
    try:
        response = await client.get("/v2/images/img/file")
        assert response.status == 200
        await http_origin.wait_for_reads("img", 4)
        flight = client.app[STATE].fills.current("img")
        assert flight is not None
        await eventually(lambda: flight.available >= 256 * 1024, "256 KiB are available")
        await asyncio.wait_for(client.app[STATE].fills.shutdown(0.01), timeout=10)
        assert flight.state.value == "failed"
        assert listdir(cache_dir / "incomplete") == []
        assert listdir(cache_dir / "invalid") == ["img"]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        response.release()
    finally:
        gate.set()
    # No descriptor of the fill's files is left open: the scratch file (unnamed, in
    # incomplete/), the fill's own, the readers'.
    assert _open_under(cache_dir / "incomplete") == []
    assert _open_under(cache_dir / "invalid") == []


async def test_a_follower_in_another_process_gets_the_exact_bytes(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Sibling processes follow the fill by its file's size: they must never read a hole."""
    cache_dir = tmp_path / "cache"
    http_origin.add("img", DATA)
    held = 256 * 1024
    gate = http_origin.gate("img", after=held)
    upstream = "http:" + http_origin.template
    env = {"IMAGECACHE_FILL_SEGMENTS": "4", "IMAGECACHE_FILL_SEGMENT_SIZE": str(MiB)}
    servers.append(await start_serve(cache_dir, upstream, env=env))
    servers.append(await start_serve(cache_dir, upstream, env=env))

    async def download(session: aiohttp.ClientSession, url: str, started: asyncio.Event) -> bytes:
        async with session.get(url + "/v2/images/img/file") as response:
            assert response.status == 200
            first = await response.content.readany()
            started.set()
            return first + await response.read()

    async with aiohttp.ClientSession() as session:
        started = [asyncio.Event(), asyncio.Event()]
        writer = asyncio.create_task(download(session, servers[0].url, started[0]))
        await http_origin.wait_for_reads("img", 4, within=20)
        follower = asyncio.create_task(download(session, servers[1].url, started[1]))
        await asyncio.wait_for(started[1].wait(), timeout=20)
        assert os.stat(cache_dir / "incomplete" / "img").st_size == held
        gate.set()
        assert await asyncio.wait_for(asyncio.gather(writer, follower), 60) == [DATA, DATA]
    assert len(_gets(http_origin)) == 8, "one segmented fill for both processes"

    async def committed() -> bool:
        return (cache_dir / "img").exists()

    await poll(committed, "the fill of img is committed")
    assert (cache_dir / "img").read_bytes() == DATA


async def test_a_full_disk_under_the_scratch_file_leaves_clients_their_bytes(
    make_client: Any, http_origin: Any, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scratch file is the cache's disk: its failure costs the cache copy, not the download.

    Its descriptor is pointed at /dev/full (no small filesystem can be mounted
    here to fill up): every segment written to it meets a real ENOSPC.
    """
    scratch_file = FillWriter.scratch_file

    def full_scratch(self: FillWriter) -> int:
        fd = scratch_file(self)
        full = os.open("/dev/full", os.O_RDWR)
        os.dup2(full, fd)
        os.close(full)
        return fd

    monkeypatch.setattr(FillWriter, "scratch_file", full_scratch)
    http_origin.add("img", DATA)
    client = await make_client(**SEGMENTED)
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        assert await response.read() == DATA
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "incomplete") == []
    assert listdir(cache_dir / "invalid") == ["img"]


async def test_one_segment_is_one_whole_get(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client(fill_segment_size=MiB)  # fill_segments = 1, the default
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    await settled(client)
    assert _gets(http_origin) == [None]
    assert (cache_dir / "img").read_bytes() == DATA
