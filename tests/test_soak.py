"""Soaks of the service as operators run it: `make test-slow` (about two and a half minutes).

Two ``imagecache serve`` processes share one cache directory in front of the
``http_origin`` peer, once for each driver (for the central one, a service
with two worker processes: a node is one URL). The size limit holds about a
third of the images, so admission evicts all the time and fills race
evictions, prunes, cleans and deletes. Waves of concurrent clients ask for whole images, ranges,
HEADs, unknown images, an image whose published checksum is wrong and one
whose origin resets mid-body. The test checks what must hold under that churn:

- every good response has exactly the origin's bytes, and no bad image is
  ever delivered whole (its last byte waits for a verification that fails);
- the limit holds, no fill is left in ``incomplete/``, no entry differs from
  its origin, and nothing bad was committed;
- neither process logged an unhandled exception, and both shut down cleanly;
- open descriptors do not grow with the waves (a leak of one descriptor per
  sixteen hits of some images fails it) and RSS ends near where it was after
  the warm-up.

Other tests run the same waves against two cluster nodes on one PostgreSQL,
which fill from each other (the database's map of what is cached where must
end up what the two disks hold), and against two processes one of which is
killed with SIGKILL mid-fill again and again. The last one puts a real Glance
behind two processes and mixes callers of two projects and anonymous ones:
nobody may get a byte of an image Glance would refuse them.

The waves are counted, not timed: the machine's speed changes how long the
soak takes, not what it checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from central_db import create_database, drop_database, postgres_url
from peers.origin import Fault
from server_helpers import ServeProcess, image_bytes, listdir, poll, start_serve
from soak_helpers import (
    RSS_SLACK_MIB,
    Descriptors,
    check_database_descriptors,
    check_descriptors,
    stop_cleanly,
    usage,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MIB = 1024 * 1024
GOOD = {f"good-{n:02d}": image_bytes(256 * 1024 + n * 197 * 1024 + n, seed=n) for n in range(16)}
CORRUPT = "corrupt"  # its sha256 sidecar names other bytes
BROKEN = "broken"  # the origin resets the connection 300 KiB into the body
BAD = {CORRUPT: image_bytes(2 * MIB, seed=100), BROKEN: image_bytes(2 * MIB, seed=101)}
MAX_SIZE = 12 * MIB  # the good images come to ~26 MiB
WAVES = 60
CLIENTS = 32
WARM_WAVES = 10  # descriptors and RSS are compared from here on
KILL_EVERY = 10  # the crash soak kills a server in every tenth wave


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Soak:
    """The clients of one soak and the problems they met, reported together at the end."""

    def __init__(self, servers: list[ServeProcess], session: aiohttp.ClientSession) -> None:
        self.servers = servers
        self.session = session
        self.problems: list[str] = []
        self.outcomes: Counter[str] = Counter()
        self.killed: set[str] = set()  # URLs of servers the test killed

    def problem(self, server: ServeProcess, what: str) -> None:
        self.problems.append(f"{server.url}: {what}")

    def failed(self, server: ServeProcess, what: str) -> None:
        """A request that ended in an error rather than an answer."""
        if server.url in self.killed:
            # Its clients lose their connection; what matters is that nobody
            # else's download notices, and that no wrong bytes went out.
            self.outcomes["lost with a killed server"] += 1
        else:
            self.problem(server, what)

    async def request(self, rng: random.Random) -> None:
        server = rng.choice(self.servers)
        roll = rng.random()
        if roll < 0.08:
            await self.bad(server, rng.choice(list(BAD)))
        elif roll < 0.10:
            await self.unknown(server)
        else:
            name = rng.choice(list(GOOD))
            if roll < 0.70:
                await self.whole(server, name)
            elif roll < 0.92:
                await self.ranged(server, name, rng)
            else:
                await self.head(server, name)

    async def whole(self, server: ServeProcess, name: str) -> None:
        data = GOOD[name]
        try:
            async with self.session.get(f"{server.url}/v2/images/{name}/file") as response:
                body = await response.read()
                status = response.status
        except aiohttp.ClientError as exc:
            self.failed(server, f"GET {name}: {exc!r}")
            return
        if status != 200 or body != data:
            self.problem(
                server, f"GET {name}: HTTP {status}, {len(body)} of {len(data)} bytes right"
            )
        self.outcomes["whole"] += 1

    async def ranged(self, server: ServeProcess, name: str, rng: random.Random) -> None:
        data = GOOD[name]
        first = rng.randrange(len(data))
        last = min(len(data) - 1, first + rng.randrange(1, 512 * 1024))
        spec = f"bytes={first}-{last}"
        try:
            async with self.session.get(
                f"{server.url}/v2/images/{name}/file", headers={"Range": spec}
            ) as response:
                body = await response.read()
                status = response.status
                content_range = response.headers.get("Content-Range")
        except aiohttp.ClientError as exc:
            self.failed(server, f"GET {name} {spec}: {exc!r}")
            return
        expected = f"bytes {first}-{last}/{len(data)}"
        if status != 206 or content_range != expected or body != data[first : last + 1]:
            self.problem(server, f"GET {name} {spec}: HTTP {status}, Content-Range {content_range}")
        self.outcomes["range"] += 1

    async def head(self, server: ServeProcess, name: str) -> None:
        try:
            async with self.session.head(f"{server.url}/v2/images/{name}/file") as response:
                status, length = response.status, response.headers.get("Content-Length")
        except aiohttp.ClientError as exc:
            self.failed(server, f"HEAD {name}: {exc!r}")
            return
        if status != 200 or length != str(len(GOOD[name])):
            self.problem(server, f"HEAD {name}: HTTP {status}, Content-Length {length}")
        self.outcomes["head"] += 1

    async def unknown(self, server: ServeProcess) -> None:
        try:
            async with self.session.get(f"{server.url}/v2/images/no-such-image/file") as response:
                status = response.status
        except aiohttp.ClientError as exc:
            self.failed(server, f"GET no-such-image: {exc!r}")
            return
        if status != 404:
            self.problem(server, f"GET no-such-image: HTTP {status}, expected 404")
        self.outcomes["unknown"] += 1

    async def bad(self, server: ServeProcess, name: str) -> None:
        body = b""
        try:
            async with self.session.get(f"{server.url}/v2/images/{name}/file") as response:
                if response.status != 200:
                    self.outcomes[f"{name} refused"] += 1
                    return
                async for chunk in response.content.iter_any():
                    body += chunk
        except aiohttp.ClientError:
            self.outcomes[f"{name} aborted"] += 1
            return
        # Fewer bytes without an error is as wrong as all of them: the client
        # would not know its image is cut short.
        self.problem(server, f"GET {name}: the response ended cleanly after {len(body)} bytes")

    async def manage(self, rng: random.Random, wave: int) -> None:
        """One management call per wave, to a random process: churn beside the clients."""
        server = rng.choice(self.servers)
        if wave % 3 == 0:
            method, path, ok = "DELETE", f"/v2/cache/{rng.choice(list(GOOD))}", {204, 404}
        elif wave % 3 == 1:
            method, path, ok = "POST", "/v2/cache/prune", {200}
        else:
            method, path, ok = "POST", "/v2/cache/clean", {200}
        try:
            async with self.session.request(method, server.url + path) as response:
                status, text = response.status, await response.text()
        except aiohttp.ClientError as exc:
            self.failed(server, f"{method} {path}: {exc!r}")
            return
        if status not in ok:
            self.problem(server, f"{method} {path}: HTTP {status}: {text}")
        self.outcomes["management"] += 1


@pytest.fixture(params=["sqlite", "xattr", "central"])
def driver_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The driver's settings. Central: a node of its own database (PostgreSQL)."""
    if request.param != "central":
        yield {"IMAGECACHE_IMAGE_CACHE_DRIVER": request.param}
        return
    name = create_database()  # skips, saying why, without a PostgreSQL server
    try:
        yield {
            "IMAGECACHE_IMAGE_CACHE_DRIVER": "central",
            "IMAGECACHE_DATABASE_URL": postgres_url(name),
        }
    finally:
        drop_database(name)


def _publish(origin: Any) -> None:
    """The soak's images at the origin: the good ones, the corrupt one, the broken one."""
    for name, data in GOOD.items():
        origin.add(name, data, sidecars=("sha256",))
    origin.add(CORRUPT, BAD[CORRUPT], content_md5=False)
    (origin.root / f"{CORRUPT}.sha256").write_text(hashlib.sha256(b"other").hexdigest())
    origin.add(BROKEN, BAD[BROKEN], sidecars=("sha256",))
    origin.fail(BROKEN, Fault.RESET, after=300 * 1024)


SOAK_ENV = {
    "IMAGECACHE_IMAGE_CACHE_MAX_SIZE": str(MAX_SIZE),
    "IMAGECACHE_FREE_SPACE_WATERMARK": "0",
    "IMAGECACHE_HTTP_CHECKSUM_SIDECAR": "true",
    "IMAGECACHE_PRUNE_INTERVAL": "1",
    "IMAGECACHE_CLEAN_INTERVAL": "2",
    # BROKEN stays broken: its resets are the fault under test, not resumed away.
    "IMAGECACHE_UPSTREAM_RESUME_ATTEMPTS": "0",
}


Restart = Callable[[ServeProcess], Awaitable[ServeProcess]]


async def _soak(
    servers: list[ServeProcess],
    cache_dirs: list[Path],
    origin: Any,
    restart: Restart | None = None,
) -> None:
    """Run the waves against ``servers`` and check the clients' side and the processes'.

    With ``restart``, every ``KILL_EVERY`` waves one server (in turn) is killed
    with SIGKILL once a fill of that wave has started reading the origin, and
    replaced by ``restart(killed)``; descriptors and RSS are then not compared
    (the processes change), everything else is.
    """

    async def no_fill_in_flight() -> bool:
        # A client aborted mid-body leaves its fill to finish detached.
        return all(listdir(cache_dir / "incomplete") == [] for cache_dir in cache_dirs)

    def origin_reads() -> int:
        return sum(state.body_reads for state in origin.images.values())

    rng = random.Random(20261201)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        soak = Soak(servers, session)
        warm: tuple[Descriptors, int] | None = None
        descriptors: list[Descriptors] = []
        for wave in range(WAVES):
            reads = origin_reads()
            requests = asyncio.gather(
                *(soak.request(rng) for _ in range(CLIENTS)), soak.manage(rng, wave)
            )
            if restart is not None and wave % KILL_EVERY == KILL_EVERY - 1:
                slot = wave // KILL_EVERY % len(servers)
                victim = servers[slot]

                async def fill_under_way(
                    before: int = reads, wave_done: asyncio.Future[Any] = requests
                ) -> bool:
                    return origin_reads() > before or wave_done.done()

                await poll(fill_under_way, "a fill of this wave reads the origin")
                soak.killed.add(victim.url)
                victim.process.kill()
                await victim.process.wait()
                await requests
                servers[slot] = await restart(victim)
                continue
            await requests
            if restart is None and wave + 1 == WARM_WAVES:
                await poll(no_fill_in_flight, "the warm-up's fills have ended")
                warm = usage(servers)
            if restart is None and wave + 1 >= WARM_WAVES:
                descriptors.append(usage(servers)[0])
        await poll(no_fill_in_flight, "every fill has committed, rolled back or been cleaned")
        end = usage(servers)

    assert not soak.problems, f"{len(soak.problems)} problems, first ones: {soak.problems[:10]}"
    # Every kind of request happened, and the bad images failed as bad images must.
    for kind in ("whole", "range", "head", "unknown", "management"):
        assert soak.outcomes[kind] > 0, soak.outcomes
    assert soak.outcomes[f"{CORRUPT} aborted"] > 0, soak.outcomes
    assert soak.outcomes[f"{BROKEN} aborted"] > 0, soak.outcomes
    if restart is not None:
        assert soak.outcomes["lost with a killed server"] > 0, soak.outcomes
        return

    assert warm is not None
    check_descriptors(descriptors)
    check_database_descriptors(servers)
    growth_mib = (end[1] - warm[1]) / 1024
    assert growth_mib <= RSS_SLACK_MIB, f"RSS grew {growth_mib:.1f} MiB after the warm-up"


def _cached(cache_dir: Path) -> list[str]:
    """The images committed in ``cache_dir``, checked: intact, good, within the limit."""
    entries = [name for name in listdir(cache_dir) if (cache_dir / name).is_file()]
    images = [name for name in entries if name in GOOD or name in BAD]
    assert not set(images) & set(BAD), f"a bad image was committed: {images}"
    for name in images:
        assert (cache_dir / name).read_bytes() == GOOD[name], f"{name} differs from its origin"
    cached_bytes = sum(len(GOOD[name]) for name in images)
    assert cached_bytes <= MAX_SIZE, f"{cached_bytes} bytes cached, limit {MAX_SIZE}"
    return images


async def test_soak_under_eviction_pressure_stays_consistent(
    driver_env: dict[str, str], http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    _publish(http_origin)
    cache_dir = tmp_path / "cache"
    upstream = "http:" + http_origin.template
    env = {**driver_env, **SOAK_ENV}
    if "IMAGECACHE_DATABASE_URL" in env:
        # A central node is known by its URL, so one service with two worker
        # processes on one port: two services on one directory would be two
        # nodes claiming the same files.
        port = _free_port()
        env["IMAGECACHE_WORKER_SELF_REFERENCE_URL"] = f"http://127.0.0.1:{port}"
        servers.append(await start_serve(cache_dir, upstream, env=env, workers=2, port=port))
    else:
        for _ in range(2):
            servers.append(await start_serve(cache_dir, upstream, env=env))

    await _soak(servers, [cache_dir], http_origin)
    assert _cached(cache_dir), "the soak left at least one image cached"
    assert http_origin.body_reads(CORRUPT) > 0  # the corrupt image was fetched, never kept
    await stop_cleanly(servers)


async def test_soak_of_a_two_node_cluster_keeps_the_map_true(
    fresh_postgres_url: str, http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Two nodes on one PostgreSQL fill from each other while both evict and delete.

    Beyond what every soak checks: each node keeps its own limit, and at the
    end the database's map of what is cached where is what the disks hold.
    """
    _publish(http_origin)
    upstream = "http:" + http_origin.template
    cache_dirs = [tmp_path / "one", tmp_path / "two"]
    for cache_dir in cache_dirs:
        port = _free_port()
        env = {
            **SOAK_ENV,
            "IMAGECACHE_IMAGE_CACHE_DRIVER": "central",
            "IMAGECACHE_DATABASE_URL": fresh_postgres_url,
            "IMAGECACHE_WORKER_SELF_REFERENCE_URL": f"http://127.0.0.1:{port}",
            "IMAGECACHE_CLUSTER_TOKEN": "soak-cluster-token",
            "IMAGECACHE_NODE_HEARTBEAT_INTERVAL": "0.2",
        }
        cache_dir.mkdir()
        servers.append(await start_serve(cache_dir, upstream, env=env, port=port))

    await _soak(servers, cache_dirs, http_origin)
    assert any(_cached(d) for d in cache_dirs), "the soak left at least one image cached"
    sibling_fills = sum(server.log().count(" from sibling ") for server in servers)
    assert sibling_fills > 0, "the nodes never filled from each other"

    async def map_is_true() -> bool:
        # Deletions reach the other node within a heartbeat or two: poll, bounded.
        async with aiohttp.ClientSession() as session:
            for name in GOOD:
                async with session.get(f"{servers[0].url}/v2/cache/nodes/{name}") as response:
                    holders = set(await response.json())
                on_disk = {
                    server.url: set(_cached(d))
                    for server, d in zip(servers, cache_dirs, strict=True)
                }
                if holders != {url for url, names in on_disk.items() if name in names}:
                    return False
        return True

    await poll(map_is_true, "the database's map matches every node's disk")
    await stop_cleanly(servers)


async def test_soak_with_servers_killed_mid_fill_stays_consistent(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """SIGKILL one of the two processes in the middle of a wave, six times, and restart it.

    The killed process's clients lose their downloads. Nobody else may notice:
    the other process's clients, followers of the dead process's fills among
    them, take the fill over or finish from the origin. What the dead left
    behind (a fill without a writer, a reservation without a process) must
    not leak into the cache or hold its room: the limit and every entry are
    checked at the end as in the other soaks.
    """
    _publish(http_origin)
    cache_dir = tmp_path / "cache"
    upstream = "http:" + http_origin.template
    # A dead writer's file is cleaned a second after it stops growing.
    env = {**SOAK_ENV, "IMAGECACHE_IMAGE_CACHE_STALL_TIME": "1"}
    for _ in range(2):
        servers.append(await start_serve(cache_dir, upstream, env=env))
    every: list[ServeProcess] = list(servers)

    async def restart(killed: ServeProcess) -> ServeProcess:
        again = await start_serve(cache_dir, upstream, env=env)
        every.append(again)
        return again

    await _soak(servers, [cache_dir], http_origin, restart)
    assert _cached(cache_dir), "the soak left at least one image cached"
    await stop_cleanly(servers)
    for server in every:
        log = server.log()
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]


async def test_soak_of_a_glance_origin_never_serves_a_caller_it_refuses(
    glance_peer_headers: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """Callers of two projects and anonymous ones, on private and public images, at once.

    Glance (identity from trusted headers, its stock policy) decides who may
    read what; what it answered for each caller and image, asked directly at
    the start, is what the two processes must answer while their fills,
    followers and hits mix callers: the image's exact bytes or a refusal,
    never a byte of an image to a caller Glance refuses. The access answers
    are remembered per caller and image (``auth_cache_ttl``, 30 s by
    default), so most of the soak's hits are served from that memory.
    """
    peer = glance_peer_headers
    callers = {
        "project-a": peer.headers_for("soak-a"),
        "project-b": peer.headers_for("soak-b"),
        # No identity at all (a header of some kind, as peer.request takes
        # no headers to mean the admin's).
        "anonymous": {"User-Agent": "imagecache-soak"},
    }
    images: dict[str, bytes] = {}
    for n in range(8):
        # Two public images (publishing takes an admin), three private ones a project.
        owner = peer.admin_headers if n < 2 else callers[("project-a", "project-b")[n % 2]]
        data = image_bytes(512 * 1024 + n * 131 * 1024, seed=200 + n)
        visibility = "public" if n < 2 else "private"
        image_id = await asyncio.to_thread(
            peer.create_image, data, visibility=visibility, headers=owner
        )
        images[image_id] = data
    allowed: dict[tuple[str, str], bool] = {}
    for who, headers in callers.items():
        for image_id in images:
            status, _ = await asyncio.to_thread(
                peer.request, "GET", f"/v2/images/{image_id}", None, headers
            )
            allowed[who, image_id] = status == 200
    # Both answers occur, or the soak would prove nothing.
    assert set(allowed.values()) == {True, False}, allowed

    cache_dir = tmp_path / "cache"
    for _ in range(2):
        servers.append(await start_serve(cache_dir, f"glance:{peer.url}"))

    problems: list[str] = []
    outcomes: Counter[str] = Counter()

    async def one(session: aiohttp.ClientSession, rng: random.Random) -> None:
        server, who = rng.choice(servers), rng.choice(list(callers))
        image_id = rng.choice(list(images))
        data = images[image_id]
        headers = dict(callers[who])
        wanted = data
        if rng.random() < 0.3:
            first = rng.randrange(len(data))
            headers["Range"] = f"bytes={first}-"
            wanted = data[first:]
        url = f"{server.url}/v2/images/{image_id}/file"
        try:
            async with session.get(url, headers=headers) as response:
                status, body = response.status, await response.read()
        except aiohttp.ClientError as exc:
            problems.append(f"{who} GET {image_id}: {exc!r}")
            return
        if allowed[who, image_id]:
            if status not in (200, 206) or body != wanted:
                problems.append(f"{who} GET {image_id}: HTTP {status}, {len(body)} bytes")
            outcomes["served"] += 1
        else:
            if status < 400 or data[:4096] in body:
                problems.append(f"{who} GET {image_id} (refused by Glance): HTTP {status}")
            outcomes["refused"] += 1

    rng = random.Random(20261202)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        for wave in range(30):
            await asyncio.gather(*(one(session, rng) for _ in range(24)))
            if wave % 10 == 9:
                # Cold again: the next waves fill while callers of every kind ask.
                async with session.delete(f"{servers[0].url}/v2/cache") as response:
                    assert response.status in (200, 204), await response.text()

    assert not problems, f"{len(problems)} problems, first ones: {problems[:10]}"
    assert outcomes["served"] > 0, outcomes
    assert outcomes["refused"] > 0, outcomes
    for name in listdir(cache_dir):
        if name in images:
            assert (cache_dir / name).read_bytes() == images[name], f"{name} differs from Glance's"
    await stop_cleanly(servers)
