"""Ranges on a cold image start its fill; ranges past the fill's frontier wait or ask the origin.

Issue 15, item 4. The origin is the ``http_origin`` peer (a real aiohttp server
on loopback) whose ``bytes_sent`` counts every body byte it wrote, so "one
image's worth of origin reads" is measured, not inferred. A real ``aria2c
-x16`` against a real ``imagecache serve`` closes it, where aria2c is installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.fill import frontier
from imagecache.fill.flight import Flight
from imagecache.server.state import STATE
from polling import eventually
from range_helpers import AHEAD, COLLAPSED, ONE_IMAGE, STORED, pieces
from server_helpers import HeldHooks, ServeProcess, filled, image_bytes, listdir, start_serve

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
MiB = 1024 * 1024
SIZE = 16 * MiB + 7
DATA = image_bytes(SIZE, seed=15)
PATH = "/v2/images/img/file"


async def ranged(client: TestClient[Any, Any], start: int, end: int) -> tuple[int, str, bytes]:
    headers = {"Range": f"bytes={start}-{end - 1}"}
    async with client.get(PATH, headers=headers) as response:
        return response.status, response.headers["Cache-Status"], await response.read()


async def test_a_cold_burst_of_16_ranges_reads_the_origin_once_and_caches_the_image(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Every range arrives before the fill's first byte: all but the first start past it."""
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=0)
    client = await make_client()
    spans = pieces(SIZE, 16)
    burst = [asyncio.create_task(ranged(client, a, b)) for a, b in spans]
    await eventually(
        lambda: (f := client.app[STATE].fills.current("img")) is not None and f.readers == 16,
        "the fill has all 16 range readers",
    )
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(*burst), 60)
    for (start, end), (status, _, body) in zip(spans, answers, strict=True):
        assert (status, body) == (206, DATA[start:end])
    assert sorted(status for _, status, _ in answers) == [COLLAPSED] * 15 + [STORED]
    await filled(client, "img")
    assert (cache_dir / "img").read_bytes() == DATA
    assert http_origin.body_reads("img") == 1
    ratio = http_origin.bytes_sent("img") / SIZE
    print(f"origin bytes / image, cold burst of 16 ranges: {ratio:.3f}")
    assert ratio <= ONE_IMAGE


async def test_16_ranges_then_a_whole_download_cost_one_image(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    spans = pieces(SIZE, 16)
    answers = await asyncio.gather(*(ranged(client, a, b) for a, b in spans))
    assert b"".join(body for _, _, body in answers) == DATA
    async with client.get(PATH) as whole:
        assert (whole.status, await whole.read()) == (200, DATA)
    ratio = http_origin.bytes_sent("img") / SIZE
    print(f"origin bytes / image, 16 ranges then a whole GET: {ratio:.3f}")
    assert ratio <= ONE_IMAGE
    assert http_origin.body_reads("img") == 1


async def test_a_client_that_reads_only_ranges_leaves_the_image_cached(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """As qemu-img over HTTP: a few small ranges, one after another, never the whole."""
    http_origin.add("img", DATA)
    client = await make_client()
    for start in (0, 5 * MiB, 64 * 1024, SIZE - 512):
        status, _, body = await ranged(client, start, min(start + 512, SIZE))
        assert (status, body) == (206, DATA[start : start + 512])
    await filled(client, "img")
    assert (cache_dir / "img").read_bytes() == DATA
    assert listdir(cache_dir / "incomplete") == []
    assert await ranged(client, 100, 200) == (206, "imagecache; hit", DATA[100:200])
    assert http_origin.body_reads("img") == 1
    assert http_origin.bytes_sent("img") <= ONE_IMAGE * SIZE


async def test_a_range_far_past_a_slow_fill_goes_to_the_origin_one_just_ahead_waits(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """A fill at 4 MiB/s: 1.4 s from a range's start is past a 0.5 s limit; 16 ms is not."""
    size = 8 * MiB
    data = DATA[:size]
    http_origin.add("img", data).rate = 4 * MiB
    client = await make_client(range_wait_limit=0.5)
    assert await ranged(client, 0, 100) == (206, STORED, data[:100])
    flight = client.app[STATE].fills.current("img")
    assert flight is not None
    await eventually(lambda: flight.available >= 2 * MiB, "2 MiB are available")
    far = size - MiB
    assert await ranged(client, far, far + 100) == (206, AHEAD, data[far : far + 100])
    assert http_origin.body_reads("img") == 2  # the fill, and the far range on its own
    near = flight.available + 64 * 1024
    assert await ranged(client, near, near + 100) == (206, COLLAPSED, data[near : near + 100])
    await filled(client, "img")
    assert (cache_dir / "img").read_bytes() == data
    assert http_origin.body_reads("img") == 2
    # The fill's one image and the far range's 100 bytes, read again: counted, no more.
    assert http_origin.bytes_sent("img") == size + 100


async def test_with_range_starts_fill_off_ranges_go_to_the_origin_and_nothing_is_cached(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """Today's behaviour, kept behind the setting: 16 ranges, 16 origin reads, no fill."""
    http_origin.add("img", DATA)
    client = await make_client(range_starts_fill=False)
    spans = pieces(SIZE, 16)
    answers = await asyncio.gather(*(ranged(client, a, b) for a, b in spans))
    assert b"".join(body for _, _, body in answers) == DATA
    assert {status for _, status, _ in answers} == {"imagecache; fwd=bypass; detail=range"}
    assert http_origin.body_reads("img") == 16
    assert http_origin.bytes_sent("img") == SIZE
    assert listdir(cache_dir / "incomplete") == []
    assert not (cache_dir / "img").exists()


async def test_a_range_whose_fill_finds_the_image_committed_is_a_hit(
    make_client: Any, http_origin: Any, cache_dir: Path
) -> None:
    """The range starts a fill; while it is decided, another process commits the image."""
    http_origin.add("img", DATA)
    hooks = HeldHooks(hold="deciding")
    client = await make_client(fill_hooks=hooks)
    part = asyncio.create_task(ranged(client, 5, 10))
    await eventually(hooks.entered.is_set, "the fill is held deciding")
    (cache_dir / "img").write_bytes(DATA)  # a writer elsewhere: the file is what counts
    hooks.release.set()
    assert await asyncio.wait_for(part, 20) == (206, "imagecache; hit", DATA[5:10])
    assert http_origin.body_reads("img") == 0


async def test_a_range_waits_no_longer_than_the_limit_for_a_stalled_fill() -> None:
    """A fill that never advances: no rate to judge by, so the limit alone ends the wait."""
    flight = Flight("img", None)
    assert await frontier.reaches(flight, 0, 0.0) is False
    assert await frontier.reaches(flight, 10, 0.2) is False
    flight.advance(11)
    assert await frontier.reaches(flight, 10, 0.0) is True  # written: no wait at all
    assert frontier.eta(flight, 10, 0.0) == 0.0
    flight.fail(RuntimeError("gone"))
    assert await frontier.reaches(flight, 1000, 0.0) is True  # ended: the follow says how


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
async def test_aria2c_x16_on_a_cold_image_reads_the_origin_once(
    http_origin: Any, cache_dir: Path, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """A real ``aria2c -x16`` against a real ``imagecache serve``: sha256, origin bytes, cached.

    96 MiB from an origin pacing each body at 32 MiB/s: aria2c's pieces past the
    first 32 MiB start well past the fill's frontier (before, they went to the
    origin: 1.21 x the image, measured at fd42188).
    """
    size = 96 * MiB + 7
    data = image_bytes(size, seed=16)
    http_origin.add("img", data).rate = 32 * MiB
    server = await start_serve(cache_dir, "http:" + http_origin.template)
    servers.append(server)
    aria2c = shutil.which("aria2c")
    assert aria2c is not None
    process = await asyncio.create_subprocess_exec(
        aria2c,
        "-x16",
        "-s16",
        "-k1M",
        "--min-split-size=1M",
        "--allow-overwrite=true",
        "--file-allocation=none",
        "--console-log-level=warn",
        "--summary-interval=0",
        "-d",
        str(tmp_path),
        "-o",
        "img.out",
        server.url + PATH,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, out.decode(errors="replace")
    got = (tmp_path / "img.out").read_bytes()
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
    ratio = http_origin.bytes_sent("img") / size
    print(f"origin bytes / image, aria2c -x16 cold: {ratio:.3f}")
    assert ratio <= ONE_IMAGE

    await eventually(lambda: (cache_dir / "img").exists(), "the image is committed", within=30)
    assert (cache_dir / "img").read_bytes() == data
