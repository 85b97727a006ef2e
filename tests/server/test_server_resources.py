"""What a real service holds after a mixed request load: descriptors, ledger entries, memory.

One ``imagecache serve`` process over a directory upstream, driven through raw
loopback sockets so that a client can also leave in the middle of a body. Every
kind of request the suite makes goes by once as a warm-up (so thread pools,
sqlite connections and caches exist), the baseline is read from the server's
``/proc``, then the same mix runs many more times and everything must come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import aiohttp
import pytest

from server_helpers import ServeProcess, image_bytes, poll, put_image, start_serve

BIG = 4 * 1024 * 1024  # well above the socket buffers, so a leaving client cuts a body short
ROUNDS = 8
# Room for the allocator keeping freed arenas and the cache database growing by
# ROUNDS * 3 rows; a leak of one buffer per request (64 KiB and more) exceeds it.
RSS_SLACK_KIB = 24 * 1024


# Each disk thread opens its own sqlite connection (the database and its WAL)
# the first time it runs a query, so those descriptors grow with the pool, up to
# its 16 threads, whatever the load; they are bounded, not returned.
_SQLITE_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
SQLITE_FDS_BOUND = 2 * 16 + 3


def _open_fds(pid: int) -> tuple[list[str], int]:
    """(what the process's descriptors point at, sqlite's excepted), and sqlite's count."""
    targets = [str(fd.readlink()) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    sqlite = [t for t in targets if t.rpartition("/")[2] in _SQLITE_FILES]
    return sorted(t for t in targets if t not in sqlite), len(sqlite)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"process {pid} has no VmRSS: it has exited")


def _ledger(cache_dir: Path) -> list[str]:
    directory = cache_dir / ".locks" / "reserved"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


async def _raw_get(url: str, path: str, *, leave_after: int | None = None) -> bytes:
    """GET ``path`` on a connection of its own; ``leave_after`` bytes: then close it."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        if leave_after is None:
            return await asyncio.wait_for(reader.read(), 30)
        received = b""
        while len(received) < leave_after:
            chunk = await asyncio.wait_for(reader.read(65536), 30)
            assert chunk, "the server closed before the body was under way"
            received += chunk
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _mixed_round(server: ServeProcess, root: Path) -> None:
    """One request of every kind; each answer is checked, so a 500 fails the test."""
    url = server.url
    miss = str(uuid.uuid4())
    put_image(root, miss, image_bytes(64 * 1024, seed=len(miss)))
    empty_miss = str(uuid.uuid4())
    put_image(root, empty_miss, b"")
    async with aiohttp.ClientSession() as session:

        async def get(path: str, status: int, headers: dict[str, str] | None = None) -> bytes:
            async with session.get(url + path, headers=headers) as response:
                body = await response.read()
                assert response.status == status, (path, response.status, body[:200])
                return body

        assert len(await get(f"/v2/images/{miss}/file", 200)) == 64 * 1024
        assert len(await get("/v2/images/big/file", 200)) == BIG  # a hit
        assert await get(f"/v2/images/{empty_miss}/file", 200) == b""
        assert await get("/v2/images/empty/file", 200) == b""  # an empty image, cached
        ranged = await get("/v2/images/big/file", 206, {"Range": "bytes=100-199"})
        assert len(ranged) == 100
        await get(f"/v2/images/{uuid.uuid4()}/file", 404)
        await get("/v2/images/-bad/file", 400)
    # Two clients that leave mid-body: one on a hit, one on a fill of its own.
    cut = str(uuid.uuid4())
    put_image(root, cut, image_bytes(BIG, seed=3))
    for image_id in ("big", cut):
        head = await _raw_get(url, f"/v2/images/{image_id}/file", leave_after=128 * 1024)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]


@pytest.mark.timeout(120)
async def test_descriptors_ledger_and_memory_return_to_baseline_after_mixed_load(
    tmp_path: Path, servers: list[ServeProcess]
) -> None:
    root = tmp_path / "images"
    put_image(root, "big", image_bytes(BIG, seed=2))
    put_image(root, "empty", b"")
    cache_dir = tmp_path / "cache"
    server = await start_serve(cache_dir, f"directory:{root}")
    servers.append(server)
    pid = server.process.pid
    for _ in range(2):  # the warm-up: every path has run once and been cached
        await _mixed_round(server, root)

    async def quiet() -> bool:
        # Fills of images whose clients left run on to their end; wait for them.
        return not _ledger(cache_dir) and not list((cache_dir / "incomplete").iterdir())

    with contextlib.suppress(AssertionError):
        await poll(quiet, "the warm-up's fills have ended", within=10)
    assert _ledger(cache_dir) == [], "reservations outlived their fills"
    baseline_fds, _ = _open_fds(pid)
    baseline_rss = _rss_kib(pid)

    for _ in range(ROUNDS):
        await _mixed_round(server, root)

    async def fds_back() -> bool:
        return await quiet() and len(_open_fds(pid)[0]) <= len(baseline_fds)

    # Connections of clients that left close as the server notices; give it time.
    with contextlib.suppress(AssertionError):
        await poll(fds_back, "descriptors are back at their baseline", within=10)
    assert _ledger(cache_dir) == [], "reservations outlived their fills"
    after, sqlite_fds = _open_fds(pid)
    assert len(after) <= len(baseline_fds), (
        f"{len(after) - len(baseline_fds)} descriptors more than before {ROUNDS} rounds; "
        f"before: {baseline_fds}, after: {after}"
    )
    assert sqlite_fds <= SQLITE_FDS_BOUND
    grown = _rss_kib(pid) - baseline_rss
    assert grown < RSS_SLACK_KIB, f"RSS grew by {grown} KiB over {ROUNDS} rounds"

    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
        text = await response.text()
    assert "imagecache_ledger_entries 0.0" in text
    assert "imagecache_open_fds " in text
