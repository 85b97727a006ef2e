"""Ranges on a cold image across a WAN (issue 15, item 4), on the rig of test_wan_fills.py.

A real nginx origin behind a shaped, delayed link; a real two-worker
``imagecache serve`` at the edge. Origin reads are what nginx logged it sent,
and what crossed the link is the relay's count. Timings are wide correctness
bounds, never measurements.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest

import test_wan_fills
from range_helpers import AHEAD, COLLAPSED, ONE_IMAGE, STORED, pieces
from server_helpers import ServeProcess, listdir, poll, put_image, start_serve
from test_wan_fills import DATA, SIZE, Site, body_reads, serve_env

pytestmark = pytest.mark.timeout(90)
# The rig's origin site (nginx behind the shaped, delayed link), shared with test_wan_fills.py.
site = test_wan_fills.site
PATH = "/v2/images/cold/file"


async def get_range(
    session: aiohttp.ClientSession, url: str, start: int, end: int
) -> tuple[int, str, bytes]:
    headers = {"Range": f"bytes={start}-{end - 1}"}
    async with session.get(url + PATH, headers=headers) as response:
        return response.status, response.headers.get("Cache-Status", ""), await response.read()


async def committed(cache_dir: Path) -> None:
    async def done() -> bool:
        return (cache_dir / "cold").exists() and listdir(cache_dir / "incomplete") == []

    await poll(done, "the fill of cold is committed")


def origin_body_bytes(site: Site) -> int:
    return sum(r.body_bytes for r in body_reads(site.image_requests("cold"), "cold"))


async def settled_log(site: Site, total: int) -> None:
    """nginx logs a request when it ends: wait until its bodies add up to ``total``."""
    await asyncio.to_thread(
        site.nginx.wait_for,
        lambda _: origin_body_bytes(site) >= total,
        10,
        f"{total} body bytes logged",
    )


async def test_a_cold_burst_of_16_ranges_on_two_workers_reads_the_image_once(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    put_image(site.root / "images", "cold", DATA, sidecar="sha256")
    cache_dir = tmp_path / "cache"
    server = await start_serve(cache_dir, site.upstream, workers=2, env=serve_env())
    servers.append(server)
    spans = pieces(SIZE, 16)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await asyncio.wait_for(
            asyncio.gather(*(get_range(session, server.url, a, b) for a, b in spans)), 60
        )
    for (start, end), (status, _, body) in zip(spans, answers, strict=True):
        assert (status, body) == (206, DATA[start:end])
    assert {status for _, status, _ in answers} <= {STORED, COLLAPSED}, answers
    await committed(cache_dir)
    assert (cache_dir / "cold").read_bytes() == DATA
    await settled_log(site, SIZE)
    reads = body_reads(site.image_requests("cold"), "cold")
    assert [(r.status, r.body_bytes, r.range) for r in reads] == [(200, SIZE, None)], reads
    link = site.relay.stats()
    print(f"WAN cold burst of 16 ranges: link {link.down_bytes / SIZE:.3f} x the image")
    assert link.down_bytes <= ONE_IMAGE * SIZE, link


async def test_a_range_far_past_a_fill_across_the_wan_goes_to_the_origin(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """At the link's 40 Mbit/s the last bytes are about 0.5 s away: past a 0.1 s limit."""
    put_image(site.root / "images", "cold", DATA, sidecar="sha256")
    cache_dir = tmp_path / "cache"
    env = serve_env(range_wait_limit=0.1)
    server = await start_serve(cache_dir, site.upstream, env=env)
    servers.append(server)
    async with aiohttp.ClientSession() as session:
        first = await get_range(session, server.url, 0, 100)
        assert first == (206, STORED, DATA[:100])
        incomplete = cache_dir / "incomplete" / "cold"

        async def a_quarter_in() -> bool:
            return incomplete.exists() and incomplete.stat().st_size >= SIZE // 4

        await poll(a_quarter_in, "the fill has a quarter of the image")
        far = await get_range(session, server.url, SIZE - 100, SIZE)
    assert far == (206, AHEAD, DATA[-100:])
    await committed(cache_dir)
    await settled_log(site, SIZE + 100)
    reads = body_reads(site.image_requests("cold"), "cold")
    assert sorted((r.body_bytes, r.range) for r in reads) == [
        (100, f"bytes={SIZE - 100}-{SIZE - 1}"),
        (SIZE, None),
    ], reads


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
async def test_aria2c_x16_across_the_wan_reads_the_image_once(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    put_image(site.root / "images", "cold", DATA, sidecar="sha256")
    cache_dir = tmp_path / "cache"
    server = await start_serve(cache_dir, site.upstream, workers=2, env=serve_env())
    servers.append(server)
    aria2c = shutil.which("aria2c")
    assert aria2c is not None
    process = await asyncio.create_subprocess_exec(
        *(aria2c, "-x16", "-s16", "-k1M", "--min-split-size=1M", "--file-allocation=none"),
        *("--console-log-level=warn", "--summary-interval=0", "-d", str(tmp_path)),
        *("-o", "cold.out", server.url + PATH),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, out.decode(errors="replace")
    assert (tmp_path / "cold.out").read_bytes() == DATA
    await committed(cache_dir)
    await settled_log(site, SIZE)
    total = origin_body_bytes(site)
    link = site.relay.stats()
    print(f"WAN aria2c -x16: origin {total / SIZE:.3f}, link {link.down_bytes / SIZE:.3f} x image")
    assert total <= ONE_IMAGE * SIZE
    assert link.down_bytes <= ONE_IMAGE * SIZE, link


async def test_a_range_far_past_a_segmented_fill_joins_it_across_the_wan(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """The same far range with 4 connections: its piece is fetched next, no second origin read."""
    put_image(site.root / "images", "cold", DATA, sidecar="sha256")
    cache_dir = tmp_path / "cache"
    piece = 256 * 1024
    env = serve_env(range_wait_limit=0.1, fill_segments=4, fill_segment_size=piece)
    server = await start_serve(cache_dir, site.upstream, env=env)
    servers.append(server)
    async with aiohttp.ClientSession() as session:
        first = await get_range(session, server.url, 0, 100)
        assert first == (206, STORED, DATA[:100])
        far = await get_range(session, server.url, SIZE - 100, SIZE)
    assert far == (206, COLLAPSED, DATA[-100:])
    await committed(cache_dir)
    assert (cache_dir / "cold").read_bytes() == DATA
    await settled_log(site, SIZE)
    reads = body_reads(site.image_requests("cold"), "cold")
    # Each piece once: the far range read none of its own.
    assert sorted(r.range or "" for r in reads) == sorted(
        f"bytes={a}-{min(a + piece, SIZE) - 1}" for a in range(0, SIZE, piece)
    ), reads
    assert origin_body_bytes(site) == SIZE
