"""The service as operators run it: real processes, real sockets, one shared cache directory.

The upstream is the ``http_origin`` peer (tests/peers/origin.py), a real aiohttp
origin on loopback that counts body reads and can hold a body at a gate the
test opens. It runs in the test's loop, the servers in their own processes.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.utils import floatToGoString

from polling import eventually
from server_helpers import ServeProcess, image_bytes, listdir, poll, start_serve

SIZE = 4 * 1024 * 1024 + 123
DATA = image_bytes(SIZE, seed=7)
HALF = SIZE // 2
CLIENTS = 32


async def _two_servers_on_a_held_image(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> tuple[Path, asyncio.Event]:
    """Two server processes on one cache directory; the origin holds "cold" at half.

    The origin sends half the body, then waits for the test to set the
    returned gate: a fill cannot finish before the test has seen it under way.
    """
    cache_dir = tmp_path / "cache"
    http_origin.add("cold", DATA)
    gate = http_origin.gate("cold", after=HALF)
    upstream = "http:" + http_origin.template
    servers.append(await start_serve(cache_dir, upstream))
    servers.append(await start_serve(cache_dir, upstream))
    return cache_dir, gate


async def test_32_cold_downloads_across_processes_read_the_origin_once(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """THE single-flight test: one body read upstream, 32 identical bodies, followers early."""
    # Two server processes on one cache directory, 16 clients each, so the
    # single flight must hold across processes, not only across coroutines.
    cache_dir, gate = await _two_servers_on_a_held_image(http_origin, tmp_path, servers)

    first_bytes = 0
    all_started = asyncio.Event()

    async def download(session: aiohttp.ClientSession, url: str) -> bytes:
        nonlocal first_bytes
        async with session.get(url + "/v2/images/cold/file") as response:
            assert response.status == 200
            assert int(response.headers["Content-Length"]) == SIZE
            first = await response.content.readany()
            assert first, "the body started"
            first_bytes += 1
            if first_bytes == CLIENTS:
                all_started.set()
            return first + await response.read()

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(download(session, servers[n % 2].url)) for n in range(CLIENTS)]
        await asyncio.wait_for(all_started.wait(), timeout=30)
        # Every client is streaming; the fill is held at the gate, so not finished.
        assert http_origin.body_reads("cold") == 1
        assert listdir(cache_dir / "incomplete") == ["cold"]
        assert not (cache_dir / "cold").exists()
        gate.set()
        bodies = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

    digest = hashlib.sha256(DATA).hexdigest()
    assert all(hashlib.sha256(body).hexdigest() == digest for body in bodies)
    assert http_origin.body_reads("cold") == 1, "the origin served the body exactly once"

    async def committed() -> bool:
        # Clients have their bodies once the fill is verified; the commit follows.
        return (cache_dir / "cold").exists() and not (cache_dir / "incomplete" / "cold").exists()

    await poll(committed, "the fill of cold is committed")
    assert (cache_dir / "cold").read_bytes() == DATA
    assert listdir(cache_dir / "incomplete") == []


async def test_ranges_at_another_process_share_its_fill(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Ranged reads sent to a second process during a fill cost the origin nothing more."""
    _, gate = await _two_servers_on_a_held_image(http_origin, tmp_path, servers)
    filler, other = servers

    async def ranged(session: aiohttp.ClientSession, spec: str) -> tuple[int, bytes]:
        url = other.url + "/v2/images/cold/file"
        async with session.get(url, headers={"Range": spec}) as response:
            return response.status, await response.read()

    async def followers(session: aiohttp.ClientSession) -> float:
        async with session.get(other.url + "/metrics") as response:
            text = await response.text()
        line = next(x for x in text.splitlines() if x.startswith("imagecache_fill_followers_total"))
        return float(line.split()[-1])

    async with (
        aiohttp.ClientSession() as session,
        session.get(filler.url + "/v2/images/cold/file") as whole,
    ):
        got = bytearray()
        while len(got) < 1024 * 1024:  # bytes a client has are in the file
            chunk = await whole.content.readany()
            assert chunk, "the body started"
            got += chunk
        parts = await asyncio.gather(
            ranged(session, "bytes=0-0"),
            ranged(session, "bytes=1000-1999"),
            ranged(session, f"bytes={len(got) - 10}-{len(got) - 1}"),
        )
        assert parts == [
            (206, DATA[:1]),
            (206, DATA[1000:2000]),
            (206, DATA[len(got) - 10 : len(got)]),
        ]
        # The image's last bytes wait in the other process until the fill is
        # verified; open the origin's gate only once that range is following.
        tail = asyncio.create_task(ranged(session, "bytes=-100"))

        async def tail_follows() -> bool:
            return await followers(session) == 4

        await poll(tail_follows, "the suffix range follows the fill")
        assert not tail.done()
        gate.set()
        assert await asyncio.wait_for(tail, timeout=30) == (206, DATA[-100:])
        assert bytes(got) + await whole.read() == DATA
    assert http_origin.body_reads("cold") == 1, "the ranges read the fill, not the origin"


async def test_serve_with_two_workers_shares_one_port_and_stops_on_sigterm(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    cache_dir = tmp_path / "cache"
    for n in range(4):
        http_origin.add(f"img-{n}", image_bytes(300_000 + n, seed=n))
    server = await start_serve(cache_dir, "http:" + http_origin.template, workers=2)
    servers.append(server)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def fetch(n: int) -> bytes:
            async with session.get(f"{server.url}/v2/images/img-{n % 4}/file") as response:
                assert response.status == 200
                return await response.read()

        bodies = await asyncio.gather(*(fetch(n) for n in range(24)))

        async def scrape() -> str:
            async with session.get(f"{server.url}/metrics") as response:
                assert response.status == 200
                return await response.text()

        # Whichever worker a scrape reaches, it reports the whole service: each
        # image came from the origin once, through one worker or the other.
        # A sibling's numbers are at most a publish interval old, hence the poll.
        upstream_bytes = sum(300_000 + n for n in range(4))
        wanted = f"imagecache_bytes_from_upstream_total {floatToGoString(upstream_bytes)}"

        async def merged() -> bool:
            return wanted in await scrape()

        await eventually(merged, "the merged metrics show every fill", within=15)
        for _ in range(6):
            text = await scrape()
            assert wanted in text, text
            # A gauge stating a setting is the same in each worker, not their sum.
            assert f"imagecache_max_size_bytes {floatToGoString(10 * 1024**3)}" in text
    for n, body in enumerate(bodies):
        assert body == image_bytes(300_000 + n % 4, seed=n % 4)
    assert all(http_origin.body_reads(f"img-{n}") == 1 for n in range(4))
    assert await server.stop() == 0
    # Both workers were up and each stopped gracefully on the forwarded SIGTERM.
    stopping = [line for line in server.log().splitlines() if "stopping" in line]
    assert len(stopping) == 2, server.log()


async def test_sigterm_mid_fill_rolls_back_cleanly(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """A fill that cannot finish within the grace period goes to invalid/, never half-committed."""
    cache_dir = tmp_path / "cache"
    http_origin.add("slow", DATA)
    http_origin.gate("slow", after=HALF)  # never opened: the fill hangs at half
    # The grace period for fills on shutdown is the upstream timeout; keep it short here.
    server = await start_serve(
        cache_dir, "http:" + http_origin.template, env={"IMAGECACHE_UPSTREAM_TIMEOUT": "1"}
    )
    servers.append(server)
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/v2/images/slow/file") as response,
    ):
        assert response.status == 200
        await response.content.readany()
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert await server.stop() == 0
    assert not (cache_dir / "slow").exists()
    assert listdir(cache_dir / "incomplete") == []
    assert listdir(cache_dir / "invalid") == ["slow"]
