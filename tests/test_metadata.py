"""One metadata read per image (metadata.py), against origins that count what they are asked.

The http origin (tests/peers/origin.py) runs in the test's loop and records
every request, so a ``HEAD`` and its sidecar GETs are one metadata read; the
Glance peer runs in headers mode, with its real per-project visibility, and
the one Glance upstream the service uses counts its own lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from clocks import ManualClock
from imagecache.metadata import NEGATIVE_TTL, MetadataCache, sweep_answers
from imagecache.records import ImageInfo
from imagecache.server.app import create_app
from imagecache.server.state import STATE
from imagecache.settings import Settings
from imagecache.upstreams import create_upstream
from imagecache.upstreams.base import ANONYMOUS, Caller
from imagecache.upstreams.glance import GlanceUpstream
from server_helpers import ServeProcess, image_bytes, start_serve

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
Get = Callable[[str], Awaitable[aiohttp.ClientResponse]]

DATA = image_bytes(2 * 1024 * 1024 + 5, seed=15)
HALF = len(DATA) // 2
HERD = 32
# The http upstream asks for these sidecars beside every HEAD (upstreams/http.py).
SIDECARS = ("sha512", "sha256", "md5")


def metadata_reads(origin: Any, name: str) -> tuple[int, int]:
    """``(HEADs, sidecar GETs)`` the origin has answered for image ``name``."""
    wanted = ("HEAD", f"/images/{name}")
    heads = sum(1 for method, path, _ in origin.requests if (method, path) == wanted)
    sidecars = sum(
        1
        for method, path, _ in origin.requests
        if method == "GET" and path in {f"/images/{name}.{algo}" for algo in SIDECARS}
    )
    return heads, sidecars


async def cold_herd(get: Get, paths: list[str], origin: Any, name: str) -> None:
    """Every path requested at once while the origin holds the body at half; all bytes checked.

    Every response has its headers (so went through the miss path and joined
    the fill) before the gate opens: none of them can be a hit.
    """
    gate = origin.gate(name, after=HALF)
    responses = await asyncio.wait_for(asyncio.gather(*(get(path) for path in paths)), 60)
    try:
        assert [response.status for response in responses] == [200] * len(paths)
        gate.set()
        bodies = await asyncio.wait_for(
            asyncio.gather(*(response.read() for response in responses)), 60
        )
    finally:
        gate.set()
        for response in responses:
            response.release()
    assert all(body == DATA for body in bodies)


# --- across worker processes ------------------------------------------------------------------


async def test_a_herd_on_two_workers_costs_the_origin_one_metadata_read_and_one_body_read(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    # Which worker accepts each connection is the kernel's choice (18 and 14
    # in one run); the next test splits a herd over two processes for sure.
    http_origin.add("cold", DATA, sidecars=("sha256",))
    env = {"IMAGECACHE_HTTP_CHECKSUM_SIDECAR": "true", "IMAGECACHE_METADATA_CACHE_TTL": "60"}
    server = await start_serve(
        tmp_path / "cache", "http:" + http_origin.template, workers=2, env=env
    )
    servers.append(server)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def get(path: str) -> aiohttp.ClientResponse:
            return await session.get(server.url + path)

        await cold_herd(get, ["/v2/images/cold/file"] * HERD, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (1, len(SIDECARS))
    assert http_origin.body_reads("cold") == 1


async def test_a_herd_split_over_two_processes_of_one_cache_costs_one_metadata_read(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Two ``serve`` processes over one cache directory: surely two processes, half each."""
    http_origin.add("cold", DATA, sidecars=("sha256",))
    env = {"IMAGECACHE_HTTP_CHECKSUM_SIDECAR": "true", "IMAGECACHE_METADATA_CACHE_TTL": "60"}
    cache_dir = tmp_path / "cache"
    upstream = "http:" + http_origin.template
    servers += await asyncio.gather(*(start_serve(cache_dir, upstream, env=env) for _ in range(2)))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def get(url: str) -> aiohttp.ClientResponse:
            return await session.get(url)

        urls = [f"{servers[n % 2].url}/v2/images/cold/file" for n in range(HERD)]
        await cold_herd(get, urls, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (1, len(SIDECARS))
    assert http_origin.body_reads("cold") == 1
    # The shared answer is a file under the lock directory, not a secret.
    assert (cache_dir / ".locks" / "metadata" / "cold").is_file()


async def test_an_answer_one_process_forgets_is_dropped_by_the_others(
    http_origin: Any, tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    """Two memories over one lock directory, as two worker processes of one cache have.

    A fill that met a new version (a refused resume, a failed verification)
    forgets the answer in its process and unlinks the shared file; another
    process that had read that file used to keep its copy for the whole TTL,
    so its next misses filled against the old version's promises and failed.
    """
    http_origin.add("img", DATA, sidecars=("sha256",))
    settings = make_settings(http_checksum_sidecar=True)
    upstream = create_upstream("http:" + http_origin.template, settings)
    try:
        first, second = (
            MetadataCache(upstream, 60, tmp_path, caller_dependent=False, wait_limit=5)
            for _ in range(2)
        )
        assert (await first.info("img")).hash_value == hashlib.sha256(DATA).hexdigest()
        assert (await second.info("img")).hash_value == hashlib.sha256(DATA).hexdigest()
        assert metadata_reads(http_origin, "img")[0] == 1, "the second read the shared file"
        newer = image_bytes(len(DATA), seed=16)
        http_origin.add("img", newer, sidecars=("sha256",))
        await first.forget("img")
        assert (await second.info("img")).hash_value == hashlib.sha256(newer).hexdigest()
        assert metadata_reads(http_origin, "img")[0] == 2
        # The answer the second process asked for is shared again: the first reads it.
        assert (await first.info("img")).hash_value == hashlib.sha256(newer).hexdigest()
        assert metadata_reads(http_origin, "img")[0] == 2
    finally:
        await upstream.close()


# --- in one process ------------------------------------------------------------------------------


@pytest.fixture
def http_app(
    http_origin: Any, make_settings: Callable[..., Settings]
) -> Callable[..., web.Application]:
    def make(**overrides: Any) -> web.Application:
        settings = make_settings(
            upstream="http:" + http_origin.template, http_checksum_sidecar=True, **overrides
        )
        return create_app(settings)

    return make


def _manual_clock(client: TestClient[Any, Any]) -> ManualClock:
    """The app's metadata cache on a clock the test moves: the TTL's arithmetic is tested."""
    clock = ManualClock()
    metadata = client.app[STATE].metadata
    metadata.clock = metadata.wall_clock = clock
    return clock


async def _forget_copy(client: TestClient[Any, Any], image_id: str) -> None:
    # The management API (loopback is admin without a token): the next herd is cold again.
    async with client.delete(f"/v2/cache/{image_id}") as response:
        assert response.status == 204


async def test_a_herd_of_coroutines_costs_one_metadata_read_and_a_second_herd_none(
    aiohttp_client: ClientFactory, http_app: Callable[..., web.Application], http_origin: Any
) -> None:
    http_origin.add("cold", DATA, sidecars=("sha256",))
    client = await aiohttp_client(http_app(metadata_cache_ttl=60))
    await cold_herd(client.get, ["/v2/images/cold/file"] * HERD, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (1, len(SIDECARS))
    assert http_origin.body_reads("cold") == 1
    await _forget_copy(client, "cold")
    await cold_herd(client.get, ["/v2/images/cold/file"] * HERD, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (1, len(SIDECARS)), "asked again within the TTL"
    assert http_origin.body_reads("cold") == 2


async def test_after_the_ttl_the_origin_is_asked_again(
    aiohttp_client: ClientFactory, http_app: Callable[..., web.Application], http_origin: Any
) -> None:
    ttl = 1.0
    http_origin.add("cold", DATA, sidecars=("sha256",))
    client = await aiohttp_client(http_app(metadata_cache_ttl=ttl))
    clock = _manual_clock(client)
    await cold_herd(client.get, ["/v2/images/cold/file"] * 8, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (1, len(SIDECARS))
    await _forget_copy(client, "cold")
    clock.now += ttl - 0.5  # within the TTL: remembered, in memory and on disk
    await cold_herd(client.get, ["/v2/images/cold/file"] * 8, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (1, len(SIDECARS))
    await _forget_copy(client, "cold")
    clock.now += 0.5  # the TTL is out
    await cold_herd(client.get, ["/v2/images/cold/file"] * 8, http_origin, "cold")
    assert metadata_reads(http_origin, "cold") == (2, 2 * len(SIDECARS))


async def test_a_refusal_is_remembered_briefly_and_never_outlives_the_upload(
    aiohttp_client: ClientFactory, http_app: Callable[..., web.Application], http_origin: Any
) -> None:
    ttl = 0.5  # refusals get at most NEGATIVE_TTL of it
    assert ttl <= NEGATIVE_TTL
    client = await aiohttp_client(http_app(metadata_cache_ttl=ttl))
    clock = _manual_clock(client)
    statuses = await asyncio.gather(*(client.get("/v2/images/later/file") for _ in range(HERD)))
    assert [response.status for response in statuses] == [404] * HERD
    for response in statuses:
        response.release()
    heads, _ = metadata_reads(http_origin, "later")
    assert heads == 1, "a herd for a missing image asked the origin once"
    http_origin.add("later", DATA)  # uploaded right after the refusal
    async with client.get("/v2/images/later/file") as response:
        assert response.status == 404, "the refusal is remembered for its TTL"
    clock.now += ttl
    async with client.get("/v2/images/later/file") as response:
        assert response.status == 200
        assert await response.read() == DATA


async def test_an_image_replaced_at_the_origin_costs_one_failed_fill_not_a_ttl_of_them(
    aiohttp_client: ClientFactory, http_app: Callable[..., web.Application], http_origin: Any
) -> None:
    """A fill that fails verification forgets the answer it was checked against."""
    http_origin.add("img", DATA, sidecars=("sha256",))
    client = await aiohttp_client(http_app(metadata_cache_ttl=60))
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == DATA
    await _forget_copy(client, "img")
    newer = image_bytes(len(DATA), seed=16)  # same size: only the checksums tell
    http_origin.add("img", newer, sidecars=("sha256",))
    with contextlib.suppress(aiohttp.ClientPayloadError):
        async with client.get("/v2/images/img/file") as response:
            assert await response.read() != DATA  # the stale answer's fill fails, is aborted
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        assert await response.read() == newer
    assert metadata_reads(http_origin, "img")[0] == 2


async def test_an_unreachable_origin_is_not_remembered(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], http_origin: Any
) -> None:
    """An error is shared by the requests that waited for it, then forgotten."""
    http_origin.add("img", DATA)
    relay = _Switch(http_origin.url)
    await relay.start()
    try:
        settings = make_settings(
            upstream=f"http:{relay.url}/images/{{image_id}}", metadata_cache_ttl=60
        )
        client = await aiohttp_client(create_app(settings))
        relay.refusing = True
        async with client.get("/v2/images/img/file") as response:
            assert response.status == 502
        relay.refusing = False
        async with client.get("/v2/images/img/file") as response:
            assert response.status == 200
            assert await response.read() == DATA
    finally:
        await relay.stop()


class _Switch:
    """A loopback TCP relay to the origin that, while ``refusing``, closes every connection.

    The origin itself stays up (it runs in this loop); the relay is what a
    client of an unreachable origin sees: connections that end unanswered.
    """

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.refusing = False
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_ttl_zero_asks_the_origin_for_every_miss(
    aiohttp_client: ClientFactory, http_app: Callable[..., web.Application], http_origin: Any
) -> None:
    http_origin.add("cold", DATA)
    client = await aiohttp_client(http_app(metadata_cache_ttl=0))
    for _ in range(3):
        async with client.head("/v2/images/cold/file") as response:
            assert response.status == 200
    assert metadata_reads(http_origin, "cold")[0] == 3


def test_old_answer_files_are_swept(tmp_path: Path) -> None:
    directory = tmp_path / "metadata"
    directory.mkdir()
    (directory / "old").write_text("{}")
    (directory / "new").write_text("{}")
    past = time.time() - 7200
    os.utime(directory / "old", (past, past))
    assert sweep_answers(tmp_path) == 1
    assert sorted(p.name for p in directory.iterdir()) == ["new"]


# --- a Glance origin: who asks matters ------------------------------------------------------


class CountingGlance(GlanceUpstream):
    """The real Glance upstream, noting which project each metadata lookup was for."""

    lookups: list[str]

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        self.lookups.append(caller.headers.get("X-Project-Id", "?"))
        return await super().info(image_id, caller)


@pytest.fixture
def glance_counted(
    glance_peer_headers: Any, make_settings: Callable[..., Settings]
) -> tuple[Any, Settings, CountingGlance]:
    settings = make_settings(upstream=f"glance:{glance_peer_headers.url}", metadata_cache_ttl=60)
    upstream = CountingGlance(glance_peer_headers.url, settings)
    upstream.lookups = []
    return glance_peer_headers, settings, upstream


@pytest.mark.glance
async def test_a_private_glance_image_is_never_answered_from_another_callers_lookup(
    aiohttp_client: ClientFactory, glance_counted: tuple[Any, Settings, CountingGlance]
) -> None:
    peer, settings, upstream = glance_counted
    owner = peer.headers_for("project-a")
    stranger = peer.headers_for("project-b")
    data = DATA[: 1024 * 1024]
    image_id = await asyncio.to_thread(peer.create_image, data, visibility="private", headers=owner)
    client = await aiohttp_client(create_app(settings, upstream=upstream))
    path = f"/v2/images/{image_id}/file"

    async def download(headers: dict[str, str]) -> tuple[int, bytes]:
        async with client.get(path, headers=headers) as response:
            return response.status, await response.read()

    # Together: whoever's lookup comes first, the stranger is refused and the
    # owners get the image; the owners' herd costs one lookup of theirs.
    got = await asyncio.gather(download(stranger), *(download(owner) for _ in range(6)))
    assert got[0][0] == 404
    assert got[1:] == [(200, data)] * 6
    assert sorted(set(upstream.lookups)) <= ["project-a", "project-b"]
    assert upstream.lookups.count("project-a") == 1, upstream.lookups
    assert upstream.lookups.count("project-b") <= 1, upstream.lookups
    lookups = len(upstream.lookups)
    # Right after the owner's successful lookup, the stranger still gets 404:
    # the shared answer describes the data, the access check decides who gets it.
    for method in ("GET", "HEAD"):
        async with client.request(method, path, headers=stranger) as response:
            assert response.status == 404, method
    async with client.get(path, headers={}) as response:
        assert response.status in (401, 403, 404)
    # No lookup for those: each was refused by its own access check. The
    # image is cached meanwhile, and the owner's hit needs no lookup either.
    assert await download(owner) == (200, data)
    assert len(upstream.lookups) == lookups
