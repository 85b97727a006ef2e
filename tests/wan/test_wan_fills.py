"""Fills across a WAN (issue 15), on the rig: real ``imagecache serve``, real nginx, real links.

The origin is a real nginx in its own network namespace, behind a veth link
shaped by ``tc`` and the project's relay (delay, black hole); the edge is a
real ``imagecache serve`` process in the root namespace. Origin reads are
counted from nginx's own access log: what the edge really asked for.
Resumable fills (resets at a half and three quarters; an image replaced
between a reset and its resume) are cut by the relay's ``reset_at``, which
counts bytes over all connections, and checked from nginx's log of each
request's ``Range`` and ``If-Range`` and from ``/metrics``.
Timings here are wide correctness bounds, never measurements (bench/ does those).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from imagecache.settings import Settings
from peers.nginx import LoggedRequest, Nginx, start_nginx
from peers.relay import RelayProcess
from peers.wan import WanRig
from server_helpers import ServeProcess, image_bytes, listdir, poll, put_image, start_serve

pytestmark = pytest.mark.timeout(60)
MIB = 1024 * 1024
SIZE = 4 * MIB + 123
DATA = image_bytes(SIZE, seed=15)
DELAY = 0.02  # one way: a 40 ms round trip on top of the link's own
LINK_MBIT = 40  # 4 MiB in about 0.85 s
CLIENTS = 16


@dataclass
class Site:
    """An origin across the rig: nginx serving ``root/images``, reached at ``upstream``."""

    nginx: Nginx
    relay: RelayProcess
    root: Path

    @property
    def upstream(self) -> str:
        return f"http:{self.relay.url}/images/{{image_id}}"

    def image_requests(self, image_id: str) -> list[LoggedRequest]:
        """What the origin was asked about ``image_id``: its body and its sidecars."""
        path = f"/images/{image_id}"
        return [r for r in self.nginx.requests() if r.path.split(".", 1)[0] == path]


@pytest.fixture
def site(wan_rig: WanRig, tmp_path: Path) -> Iterator[Site]:
    host = wan_rig.add_host("o", mbit=LINK_MBIT)
    root = tmp_path / "origin"
    (root / "images").mkdir(parents=True)
    nginx = start_nginx(host, root, tmp_path / "nginx")
    try:
        with RelayProcess((host.address, 8080), delay=DELAY) as relay:
            yield Site(nginx, relay, root)
    finally:
        nginx.stop()


def serve_env(**settings: object) -> dict[str, str]:
    """The service's settings as its environment (only those this checkout knows).

    A setting another branch is adding (resumable fills) is passed only where
    it exists, so a test holds both before and after that lands.
    """
    env = {"IMAGECACHE_LOG_FORMAT": "json", "IMAGECACHE_HTTP_CHECKSUM_SIDECAR": "true"}
    for name, value in settings.items():
        if name in Settings.model_fields:
            env[f"IMAGECACHE_{name.upper()}"] = str(value)
    return env


def metadata_reads(requests: list[LoggedRequest], image_id: str) -> list[LoggedRequest]:
    """The requests of one ``info`` of the http upstream: a HEAD, then one GET per sidecar."""
    return [r for r in requests if r.method == "HEAD" or r.path != f"/images/{image_id}"]


def body_reads(requests: list[LoggedRequest], image_id: str) -> list[LoggedRequest]:
    return [r for r in requests if r.method == "GET" and r.path == f"/images/{image_id}"]


def json_lines(server: ServeProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def access_lines(server: ServeProcess) -> list[dict[str, object]]:
    return [record for record in json_lines(server) if record.get("logger") == "imagecache.access"]


async def worker_of(server: ServeProcess, remote: str) -> int:
    """The pid of the worker that logged a request from ``remote``.

    The access line is written as the response ends, so a client may hold the
    answer a moment before the line is in the log: polled with a deadline.
    """
    found: list[int] = []

    async def logged() -> bool:
        found[:] = [int(str(x["pid"])) for x in access_lines(server) if x["remote"] == remote]
        return bool(found)

    await poll(logged, f"the access line of a request from {remote}", within=5)
    return found[0]


async def sessions_on_both_workers(
    server: ServeProcess, per_worker: int
) -> tuple[list[aiohttp.ClientSession], dict[int, int]]:
    """``per_worker`` keep-alive sessions held open to each of the two worker processes.

    The workers share one listening socket and whichever is quicker accepts a
    connection, so a herd sent at once may land on one worker alone. Each
    session here connects from its own loopback source address, which the
    access log names beside the worker's pid: the sessions kept are known to
    sit on either worker, ``per_worker`` on each. Returns them and the count
    per pid.
    """
    opened: list[tuple[str, aiohttp.ClientSession]] = []
    kept: dict[int, list[aiohttp.ClientSession]] = {}
    try:
        for n in range(2, 250):
            source = f"127.0.0.{n}"
            connector = aiohttp.TCPConnector(limit=1, local_addr=(source, 0))
            session = aiohttp.ClientSession(connector=connector)
            opened.append((source, session))
            async with session.get(server.url + "/healthcheck") as response:
                assert response.status == 200
            pid = await worker_of(server, source)
            on_worker = kept.setdefault(pid, [])
            if len(on_worker) < per_worker:
                on_worker.append(session)
            if len(kept) == 2 and all(len(v) == per_worker for v in kept.values()):
                break
        assert len(kept) == 2, f"only worker(s) {sorted(kept)} ever accepted a connection"
        chosen = [s for sessions in kept.values() for s in sessions]
        for _, session in opened:
            if session not in chosen:
                await session.close()
        return chosen, {pid: len(v) for pid, v in kept.items()}
    except BaseException:
        for _, session in opened:
            await session.close()
        raise


async def test_a_herd_across_two_workers_costs_the_origin_one_metadata_read_and_one_body_read(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    put_image(site.root / "images", "cold", DATA, sidecar="sha256")
    cache_dir = tmp_path / "cache"
    server = await start_serve(cache_dir, site.upstream, workers=2, env=serve_env())
    servers.append(server)
    sessions, per_pid = await sessions_on_both_workers(server, CLIENTS // 2)
    assert list(per_pid.values()) == [CLIENTS // 2] * 2, per_pid
    assert site.image_requests("cold") == [], "nothing asked the origin about the image yet"

    async def download(session: aiohttp.ClientSession) -> bytes:
        async with session.get(server.url + "/v2/images/cold/file") as response:
            assert response.status == 200, await response.text()
            return await response.read()

    try:
        bodies = await asyncio.wait_for(asyncio.gather(*map(download, sessions)), timeout=30)
    finally:
        for session in sessions:
            await session.close()

    assert all(body == DATA for body in bodies), [len(body) for body in bodies]
    served = [x for x in access_lines(server) if x["path"] == "/v2/images/cold/file"]
    assert {int(str(x["pid"])) for x in served} == set(per_pid), "both workers served the herd"

    async def committed() -> bool:
        return (cache_dir / "cold").exists() and listdir(cache_dir / "incomplete") == []

    await poll(committed, "the fill of cold is committed")
    # nginx logs a request when it ends: the body GET is there once the fill is.
    asked = await asyncio.to_thread(
        site.nginx.wait_for,
        lambda logged: any(r.path == "/images/cold" and r.method == "GET" for r in logged),
        10,
        "the body read",
    )
    asked = site.image_requests("cold")
    # One metadata read of the http upstream with sidecars on: a HEAD, then a
    # GET of each sidecar (.sha512 and .md5 are absent here: 404).
    metadata = sorted((r.method, r.path, r.status) for r in metadata_reads(asked, "cold"))
    assert metadata == [
        ("GET", "/images/cold.md5", 404),
        ("GET", "/images/cold.sha256", 200),
        ("GET", "/images/cold.sha512", 404),
        ("HEAD", "/images/cold", 200),
    ], asked
    bodies_read = body_reads(asked, "cold")
    assert [(r.status, r.body_bytes) for r in bodies_read] == [(200, SIZE)], asked
    # Over the link: the one body, plus the metadata's headers and sidecars.
    link = site.relay.stats()
    assert SIZE <= link.down_bytes <= SIZE + 16 * 1024, link
    assert (cache_dir / "cold").read_bytes() == DATA
    digest = hashlib.sha256(DATA).hexdigest()
    assert (site.root / "images" / "cold.sha256").read_text().startswith(digest)


async def test_a_partition_longer_than_the_retry_budget_fails_the_fill_into_invalid(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    put_image(site.root / "images", "cut", DATA, sidecar="sha256")
    cache_dir = tmp_path / "cache"
    # A short upstream timeout and (where resumable fills exist) a small retry
    # budget: the partition below outlasts all of them within a few seconds.
    env = serve_env(upstream_timeout=1, upstream_resume_attempts=2, upstream_resume_backoff=0.1)
    server = await start_serve(cache_dir, site.upstream, env=env)
    servers.append(server)
    partial = cache_dir / "incomplete" / "cut"
    received: list[bytearray] = [bytearray() for _ in range(4)]

    async def download(session: aiohttp.ClientSession, got: bytearray) -> BaseException | None:
        try:
            async with session.get(server.url + "/v2/images/cut/file") as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    got += chunk
        except aiohttp.ClientError as exc:
            return exc
        return None

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [asyncio.create_task(download(session, got)) for got in received]

        async def a_quarter_written() -> bool:
            return partial.exists() and partial.stat().st_size >= SIZE // 4

        await poll(a_quarter_written, "the fill wrote a quarter of the image", within=10)
        site.relay.blackhole()
        cut_at = partial.stat().st_size
        assert cut_at < SIZE, "the partition came after the whole body"
        errors = await asyncio.wait_for(asyncio.gather(*clients), timeout=20)

    assert all(isinstance(error, aiohttp.ClientPayloadError) for error in errors), errors
    for got in received:
        assert len(got) < SIZE
        assert DATA.startswith(bytes(got))

    async def failed() -> bool:
        return listdir(cache_dir / "invalid") == ["cut"] and listdir(cache_dir / "incomplete") == []

    await poll(failed, "the failed fill is moved to invalid/")
    assert cut_at <= (cache_dir / "invalid" / "cut").stat().st_size < SIZE
    assert not (cache_dir / "cut").exists(), "nothing committed"

    # The black hole held the requests sent into it (a retry's GET, where fills
    # resume): they reach nginx now, so the origin's count from here on is not
    # asserted exactly; what matters is that the next client gets the image.
    site.relay.restore()
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + "/v2/images/cut/file") as response,
    ):
        assert response.status == 200
        assert await response.read() == DATA

    async def committed() -> bool:
        return (cache_dir / "cut").exists()

    await poll(committed, "the fill after the partition is committed")
    assert (cache_dir / "cut").read_bytes() == DATA
    # Both resumes went into the black hole and timed out: the attempts ran out, once.
    counted = await wait_for_resumes(server, exhausted=1)
    assert counted == {"resumed": 0, "refused": 0, "exhausted": 1}, counted


# --- resumable fills on the rig (issue 15, "What it must show") ---------------------------

HERD = 8
RESUME_ENV = {"upstream_resume_attempts": 5, "upstream_resume_backoff": 0.05}


def nginx_etag(path: Path) -> str:
    """The strong ETag nginx sends for a static file: its mtime and size, in hex."""
    stat = path.stat()
    return f'"{int(stat.st_mtime):x}-{stat.st_size:x}"'


def write_image(root: Path, image_id: str, data: bytes, mtime: int) -> None:
    """Put (or replace) an image and its sidecar by rename, with the given mtime.

    A rename: nginx goes on sending the file it opened, as a real origin that
    publishes a new version would. The mtime is set so the new version's
    ETag differs even when it lands within the same second (nginx's ETag is
    mtime-size, and the versions here have the same size).
    """
    staging = root / ".staging"
    put_image(staging, image_id, data, sidecar="sha256")
    for name in (image_id, f"{image_id}.sha256"):
        os.utime(staging / name, (mtime, mtime))
        os.replace(staging / name, root / name)


async def resumes_counted(server: ServeProcess) -> dict[str, float]:
    """``imagecache_upstream_resumes_total`` by outcome, from /metrics (both workers)."""
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    lint_metrics(text)
    pattern = r'^imagecache_upstream_resumes_total\{outcome="(\w+)"\} (\S+)$'
    return {outcome: float(value) for outcome, value in re.findall(pattern, text, re.M)}


def lint_metrics(text: str) -> None:
    """``promtool check metrics`` on a scrape, where promtool is installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # tests/test_observability.py skips loudly for it
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def wait_for_resumes(server: ServeProcess, **wanted: float) -> dict[str, float]:
    """Poll /metrics until the resume counts are ``wanted`` (each worker publishes every second)."""
    seen: dict[str, float] = {}

    async def counted() -> bool:
        seen.update(await resumes_counted(server))
        return all(seen.get(outcome) == value for outcome, value in wanted.items())

    await poll(counted, f"imagecache_upstream_resumes_total is {wanted} (last seen {seen})", 10)
    return seen


async def test_resets_at_a_half_and_three_quarters_are_resumed_for_a_herd_on_two_workers(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    images = site.root / "images"
    write_image(images, "flaky", DATA, mtime=1_700_000_000)
    cache_dir = tmp_path / "cache"
    server = await start_serve(cache_dir, site.upstream, workers=2, env=serve_env(**RESUME_ENV))
    servers.append(server)
    sessions, per_pid = await sessions_on_both_workers(server, HERD // 2)
    # Counted over every origin->edge byte from here: the body's first
    # connection is cut at half the image, the resumed one (which starts at the
    # cut) at three quarters. The metadata's few hundred bytes come first, so
    # the cuts land that much before a half and three quarters of the body.
    site.relay.reset_at(SIZE // 2, 3 * SIZE // 4)

    async def download(session: aiohttp.ClientSession) -> str:
        digest = hashlib.sha256()
        async with session.get(server.url + "/v2/images/flaky/file") as response:
            assert response.status == 200, await response.text()
            async for chunk in response.content.iter_any():
                digest.update(chunk)
        return digest.hexdigest()

    try:
        digests = await asyncio.wait_for(asyncio.gather(*map(download, sessions)), timeout=30)
    finally:
        for session in sessions:
            await session.close()
    assert digests == [hashlib.sha256(DATA).hexdigest()] * HERD
    served = [x for x in access_lines(server) if x["path"] == "/v2/images/flaky/file"]
    assert {int(str(x["pid"])) for x in served} == set(per_pid), "both workers served the herd"

    async def committed() -> bool:
        return (cache_dir / "flaky").exists() and listdir(cache_dir / "incomplete") == []

    await poll(committed, "the fill of flaky is committed")
    assert (cache_dir / "flaky").read_bytes() == DATA
    link = site.relay.stats()
    assert link.resets == 2, link
    assert link.reset_at == [], link

    # nginx logs the cut requests as it notices them: wait for all three GETs.
    def three_gets(logged: list[LoggedRequest]) -> bool:
        return len(body_reads(logged, "flaky")) == 3

    await asyncio.to_thread(site.nginx.wait_for, three_gets, 10, "the body GET and two resumes")
    gets = body_reads(site.image_requests("flaky"), "flaky")
    assert [(r.status, r.range, r.if_range) for r in gets[:1]] == [(200, None, None)], gets
    assert [r.status for r in gets[1:]] == [206, 206], gets
    assert all(r.if_range == nginx_etag(images / "flaky") for r in gets[1:]), gets
    starts = [int(str(r.range).removeprefix("bytes=").split("-")[0]) for r in gets[1:]]
    assert [r.range for r in gets[1:]] == [f"bytes={start}-{SIZE - 1}" for start in starts]
    # Where the relay cut, less the metadata and headers before it (a few KiB at most).
    assert SIZE // 2 - 8192 < starts[0] < SIZE // 2, starts
    assert 3 * SIZE // 4 - 8192 < starts[1] < 3 * SIZE // 4, starts
    # The last resume ran to the end; the cut ones sent what the relay let
    # through plus what was in flight (socket buffers, the delay line) at the cut.
    assert gets[2].body_bytes == SIZE - starts[1]
    assert gets[0].body_bytes >= starts[0], gets
    assert gets[1].body_bytes >= starts[1] - starts[0], gets
    link_ratio = link.down_bytes / SIZE
    wire_ratio = link.origin_bytes / SIZE
    origin_ratio = sum(r.body_bytes for r in gets) / SIZE
    print(
        f"\nresumed twice: to the edge / image {link_ratio:.4f}, over the origin's link / image"
        f" {wire_ratio:.4f}, nginx body bytes / image {origin_ratio:.4f}"
    )
    # To the edge: the image once, plus the metadata and the responses' headers.
    assert link_ratio <= 1.01, link
    # Over the origin's link: also what the relay held at each cut (a link's
    # worth in flight, about 100 KB here), thrown away with the connection.
    assert wire_ratio <= 1.1, link
    # nginx counts what it wrote into its socket, also what was still in its
    # kernel send buffer at a cut and never crossed the link (the kernel sizes
    # that buffer by itself, up to net.ipv4.tcp_wmem's maximum: about 1 MiB a
    # cut was seen here). Bounded per cut, not per image: 2 MiB a cut.
    assert sum(r.body_bytes for r in gets) - SIZE <= 2 * 2 * MIB, gets
    counted = await wait_for_resumes(server, resumed=2)
    assert counted == {"resumed": 2, "refused": 0, "exhausted": 0}, counted


def spliced_at(got: bytes, old: bytes, new: bytes) -> str:
    """Where ``got`` leaves ``old``, and whether it goes on with ``new`` there (a splice)."""
    at = next((i for i, (a, b) in enumerate(zip(got, old, strict=False)) if a != b), len(got))
    where = "the new version" if got[at:] == new[at : len(got)] else "neither version"
    return f"{len(got)} bytes received, the old version's up to byte {at}, then {where}"


async def test_an_image_changed_between_the_reset_and_the_resume_is_never_spliced(
    site: Site, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    images = site.root / "images"
    write_image(images, "moving", DATA, mtime=1_700_000_000)
    old_etag = nginx_etag(images / "moving")
    new = image_bytes(SIZE, seed=16)  # the same size: only the ETag tells the versions apart
    cache_dir = tmp_path / "cache"
    # The metadata remembered longer than the test lasts: the other worker still
    # holds the old version's promises in memory when the next GET reaches it.
    env = serve_env(metadata_cache_ttl=120, **RESUME_ENV)
    server = await start_serve(cache_dir, site.upstream, workers=2, env=env)
    servers.append(server)
    sessions, per_pid = await sessions_on_both_workers(server, 2)
    try:
        await _changed_between_reset_and_resume(
            site, server, cache_dir, sessions, list(per_pid), old_etag, new
        )
    finally:
        for session in sessions:
            await session.close()


async def _changed_between_reset_and_resume(
    site: Site,
    server: ServeProcess,
    cache_dir: Path,
    sessions: list[aiohttp.ClientSession],
    pids: list[int],
    old_etag: str,
    new: bytes,
) -> None:
    """The scenario above; ``sessions`` come two per worker, in the order of ``pids``."""
    images = site.root / "images"
    partial = cache_dir / "incomplete" / "moving"
    site.relay.reset_at(SIZE // 2)
    received: list[bytearray] = [bytearray() for _ in sessions]

    async def download(session: aiohttp.ClientSession, got: bytearray) -> BaseException | None:
        try:
            async with session.get(server.url + "/v2/images/moving/file") as response:
                assert response.status == 200
                async for chunk in response.content.iter_any():
                    got += chunk
        except aiohttp.ClientError as exc:
            return exc
        return None

    try:
        clients = [
            asyncio.create_task(download(*pair)) for pair in zip(sessions, received, strict=True)
        ]

        async def body_flowing() -> bool:
            return partial.exists() and partial.stat().st_size >= SIZE // 8

        # nginx is sending the old file now. Hold the link, so that the cut at
        # half and the resume come after the new version is in place, whatever
        # the timing: the black hole's answer says whether the cut is still ahead.
        await poll(body_flowing, "the body is flowing", within=10)
        held = site.relay.blackhole()
        assert held.reset_at == [SIZE // 2], f"the cut came before the black hole: {held}"
        write_image(images, "moving", new, mtime=1_700_000_600)
        assert nginx_etag(images / "moving") != old_etag
        site.relay.restore()
        errors = await asyncio.wait_for(asyncio.gather(*clients), timeout=20)
    finally:
        site.relay.restore()

    # Every client was cut off with a prefix of the old version, never the new bytes.
    assert all(isinstance(error, aiohttp.ClientPayloadError) for error in errors), errors
    for got in received:
        assert len(got) < SIZE
        assert DATA.startswith(bytes(got)), spliced_at(bytes(got), DATA, new)

    async def failed() -> bool:
        return (
            listdir(cache_dir / "invalid") == ["moving"] and listdir(cache_dir / "incomplete") == []
        )

    await poll(failed, "the refused fill is moved to invalid/")
    assert not (cache_dir / "moving").exists(), "nothing committed"
    assert "was not resumed: the origin answered HTTP 200" in server.log()
    # The resume asked for the old version (If-Range) and nginx answered with the new one.
    await asyncio.to_thread(
        site.nginx.wait_for,
        lambda logged: len(body_reads(logged, "moving")) == 2,
        10,
        "the body GET and the refused resume",
    )
    first, resume = body_reads(site.image_requests("moving"), "moving")
    assert (first.status, first.range) == (200, None)
    assert resume.status == 200, resume
    assert resume.range is not None, resume
    assert resume.range.endswith(f"-{SIZE - 1}"), resume
    assert resume.if_range == old_etag, resume
    counted = await wait_for_resumes(server, refused=1)
    assert counted == {"resumed": 0, "refused": 1, "exhausted": 0}, counted

    # The next GET gets the new version whole, and caches it: the refusal made
    # the service forget what the origin had promised about the old one, in
    # both workers. Asked of the worker that did not run the fill, which had
    # the old promises in memory too.
    [filled_by] = {
        int(str(x["pid"]))
        for x in json_lines(server)
        if str(x.get("logger", "")).startswith("imagecache.fill")
        and "fill of moving failed" in str(x["message"])
    }
    [other] = [pid for pid in pids if pid != filled_by]
    session = sessions[pids.index(other) * 2]
    async with session.get(server.url + "/v2/images/moving/file") as response:
        assert response.status == 200
        assert await response.read() == new

    async def committed() -> bool:
        return (cache_dir / "moving").exists()

    await poll(committed, "the new version is committed")
    assert (cache_dir / "moving").read_bytes() == new
