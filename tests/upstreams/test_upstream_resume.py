"""Resuming a broken origin body (upstreams/resume.py), over real sockets.

``VersionedOrigin`` is an aiohttp origin on loopback written for these tests:
it serves one image with a strong ETag (or only Last-Modified, or only
Glance's ``Content-MD5``), single ranges and ``If-Range``, and resets the
connection (``transport.abort()`` with linger 0) after a given number of body
bytes on its first requests; it can replace the image at the moment of a cut,
so the resume meets another version. It counts the body bytes it sent. The
same origin answers Glance's image routes, so the glance upstream goes through
the same module; S3 goes through moto behind the contract suite's cutter.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.errors import ResumeRefused, UpstreamError
from imagecache.server.app import create_app
from imagecache.settings import Settings
from imagecache.upstreams import Upstream, create_upstream
from imagecache.upstreams.base import BlockingSource, Releasable
from imagecache.upstreams.resume import BACKOFF_CAP, ResumePolicy, Validator
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents, ResumeOutcome
from peers.cutter import Cutter
from polling import eventually
from server_helpers import image_bytes, listdir, settled

SIZE = 1024 * 1024 + 13
DATA = image_bytes(SIZE, seed=11)
OTHER = image_bytes(SIZE, seed=12)  # the same length: only the validators tell them apart
CHUNK = 16 * 1024
MiB = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
GLANCE_ID = "6f1d3c2a-0000-4000-8000-00000000abcd"


@dataclass
class VersionedOrigin:
    """The origin's state; tests set the fields, handlers read them per request."""

    data: bytes = DATA
    version: int = 1
    send_etag: bool = True
    send_last_modified: bool = True
    send_md5: bool = True
    honour_range: bool = True
    honour_if_range: bool = True
    chunked_whole: bool = False  # a 200 sent chunked, as Glance sends whole images
    cuts: list[int] = field(default_factory=list)  # body bytes before a reset, per request
    cut_forever: int | None = None  # once cuts run out: reset every request after this
    replace_on_cut: bytes | None = None  # the next version, put in place at the first cut
    body_bytes: int = 0
    gets: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    @property
    def etag(self) -> str:
        return f'"v{self.version}"'

    @property
    def last_modified(self) -> str:
        return f"Wed, 02 Dec 2026 1{self.version}:00:00 GMT"

    def headers(self) -> dict[str, str]:
        out = {"Accept-Ranges": "bytes"}
        if self.send_etag:
            out["ETag"] = self.etag
        if self.send_last_modified:
            out["Last-Modified"] = self.last_modified
        if self.send_md5:
            out["Content-MD5"] = hashlib.md5(self.data).hexdigest()
        return out

    def _matches(self, if_range: str) -> bool:
        return if_range in (self.etag if self.send_etag else None, self.last_modified)

    async def image(self, request: web.Request) -> web.StreamResponse:
        headers = self.headers()
        data = self.data
        start, end, status = 0, len(data), 200
        asked = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        fresh = if_range is None or not self.honour_if_range or self._matches(if_range)
        if asked and self.honour_range and fresh and (match := _RANGE.match(asked)):
            start = int(match.group(1))
            end = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        if status == 200 and self.chunked_whole:
            response.enable_chunked_encoding()
        else:
            response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        self.gets.append(dict(request.headers))
        cut = self.cuts.pop(0) if self.cuts else self.cut_forever
        sent = 0
        body = data[start:end]
        while sent < len(body):
            piece = body[sent : sent + CHUNK]
            if cut is not None and sent + len(piece) > cut:
                piece = piece[: cut - sent]
                await response.write(piece)
                self.body_bytes += len(piece)
                self._reset(request)
                return response
            await response.write(piece)
            sent += len(piece)
            self.body_bytes += len(piece)
        await response.write_eof()
        return response

    def _reset(self, request: web.Request) -> None:
        if self.replace_on_cut is not None:
            self.data, self.replace_on_cut = self.replace_on_cut, None
            self.version += 1
        transport = request.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        # Linger 0 turns close() into an RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def glance_image(self, request: web.Request) -> web.Response:
        document = {
            "id": GLANCE_ID,
            "status": "active",
            "size": len(self.data),
            "checksum": hashlib.md5(self.data).hexdigest(),
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(self.data).hexdigest(),
        }
        return web.json_response(document, dumps=json.dumps)


@pytest.fixture
async def origin() -> AsyncIterator[VersionedOrigin]:
    state = VersionedOrigin()
    app = web.Application()
    app.router.add_route("GET", "/images/{name}", state.image)
    app.router.add_route("HEAD", "/images/{name}", state.image)
    # Glance's shape: metadata, and the data route (which sends no ETag: see glance_origin).
    app.router.add_route("GET", "/v2/images/{id}", state.glance_image)
    app.router.add_route("GET", "/v2/images/{id}/file", state.image)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    yield state
    await runner.cleanup()


@pytest.fixture
async def upstreams() -> AsyncIterator[list[Upstream]]:
    """Upstreams a test built, closed at its end."""
    built: list[Upstream] = []
    yield built
    for upstream in built:
        await upstream.close()


@pytest.fixture
def make_upstream(
    origin: VersionedOrigin, make_settings: Callable[..., Settings], upstreams: list[Upstream]
) -> Callable[..., Upstream]:
    def make(
        kind: str = "http",
        attempts: int = 5,
        backoff: float = 0,
        events: ResumeEvents = NO_RESUME_EVENTS,
    ) -> Upstream:
        target = f"{origin.url}/images/{{image_id}}" if kind == "http" else origin.url
        settings = make_settings(upstream_resume_attempts=attempts, upstream_resume_backoff=backoff)
        upstream = create_upstream(f"{kind}:{target}", settings, resume_events=events)
        upstreams.append(upstream)
        return upstream

    return make


async def collect(upstream: Upstream, image_id: str, **span: int) -> bytes:
    return b"".join([chunk async for chunk in upstream.stream(image_id, **span)])


async def drain(upstream: Upstream, image_id: str) -> bytes:
    """``open_source`` read to its end in a thread, as the fill pump reads it."""
    source = await upstream.open_source(image_id)
    assert source is not None
    return await asyncio.to_thread(_read_all, source)


def _read_all(source: BlockingSource) -> bytes:
    out = bytearray()
    view = memoryview(bytearray(256 * 1024))
    try:
        while count := source.readinto(view):
            out += view[:count]
    finally:
        source.close()
    return bytes(out)


READERS = {"stream": collect, "open_source": drain}


def image_id_for(kind: str) -> str:
    return GLANCE_ID if kind == "glance" else "img"


# --- a break is resumed: byte-exact, and the origin sends about one image ------------------


@pytest.mark.parametrize("kind", ["http", "glance"])
@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_two_resets_are_resumed_byte_exact(
    origin: VersionedOrigin, make_upstream: Any, kind: str, path: str
) -> None:
    if kind == "glance":
        # Glance's data route: no ETag, no Last-Modified, the whole image chunked;
        # the md5 of the whole image on every answer.
        origin.send_etag = origin.send_last_modified = False
        origin.chunked_whole = True
    origin.cuts = [300_000, 400_000]
    upstream = make_upstream(kind)
    assert (await upstream.info(image_id_for(kind))).size == SIZE
    got = await READERS[path](upstream, image_id_for(kind))
    assert got == DATA
    assert len(origin.gets) == 3
    # About one image: what a reset threw away in flight, not a restart from zero.
    assert SIZE <= origin.body_bytes < SIZE + 2 * 256 * 1024
    first_resume = origin.gets[1]
    if kind == "http":
        assert re.fullmatch(r"bytes=\d+-" + str(SIZE - 1), first_resume["Range"])
        assert first_resume["If-Range"] == '"v1"'
    else:
        # No length on the chunked first answer: to the end, whatever it is.
        assert re.fullmatch(r"bytes=\d+-", first_resume["Range"])
        assert "If-Range" not in first_resume


async def test_a_range_is_resumed_within_the_range_and_logged(
    origin: VersionedOrigin, make_upstream: Any, caplog: pytest.LogCaptureFixture
) -> None:
    origin.cuts = [100_000]
    upstream = make_upstream()
    with caplog.at_level(logging.WARNING, logger="imagecache.upstreams.resume"):
        assert await collect(upstream, "img", start=5000, end=700_000) == DATA[5000:700_000]
    asked = origin.gets[1]["Range"]
    assert asked.endswith("-699999")
    offset = int(asked.removeprefix("bytes=").split("-")[0])
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.args is not None
    assert record.args[:4] == ("img", offset, 1, 5)  # image, offset, attempt, of


async def test_only_last_modified_goes_into_if_range(
    origin: VersionedOrigin, make_upstream: Any
) -> None:
    origin.send_etag = False
    origin.cuts = [200_000]
    upstream = make_upstream()
    assert await collect(upstream, "img") == DATA
    assert origin.gets[1]["If-Range"] == origin.last_modified


# --- never splice two versions -------------------------------------------------------------


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_image_changed_between_break_and_resume_is_refused(
    origin: VersionedOrigin, make_upstream: Any, path: str
) -> None:
    origin.cuts = [300_000]
    origin.replace_on_cut = OTHER
    upstream = make_upstream()
    with pytest.raises(ResumeRefused, match="HTTP 200"):
        await READERS[path](upstream, "img")
    assert len(origin.gets) == 2  # refused at the first resume, not retried


async def test_changed_etag_on_a_206_is_refused(
    origin: VersionedOrigin, make_upstream: Any
) -> None:
    # An origin that does not honour If-Range would splice; the 206's ETag gives it away.
    origin.honour_if_range = False
    origin.cuts = [300_000]
    origin.replace_on_cut = OTHER
    upstream = make_upstream()
    with pytest.raises(ResumeRefused, match="ETag"):
        await collect(upstream, "img")


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_glance_image_changed_is_refused_by_its_md5(
    origin: VersionedOrigin, make_upstream: Any, path: str
) -> None:
    origin.send_etag = origin.send_last_modified = False
    origin.chunked_whole = True
    origin.cuts = [300_000]
    origin.replace_on_cut = OTHER
    upstream = make_upstream("glance")
    with pytest.raises(ResumeRefused, match="content-md5"):
        await READERS[path](upstream, GLANCE_ID)


async def test_changed_length_is_refused(origin: VersionedOrigin, make_upstream: Any) -> None:
    origin.honour_if_range = False
    origin.send_etag = origin.send_last_modified = False  # Content-MD5 only
    origin.cuts = [300_000]
    origin.replace_on_cut = DATA + b"more"
    upstream = make_upstream()
    with pytest.raises(ResumeRefused, match="now"):
        await collect(upstream, "img")


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_origin_that_ignores_range_is_refused_not_spliced(
    origin: VersionedOrigin, make_upstream: Any, path: str
) -> None:
    origin.honour_range = False
    origin.cuts = [300_000]
    upstream = make_upstream()
    with pytest.raises(ResumeRefused, match="HTTP 200"):
        await READERS[path](upstream, "img")


async def test_no_validator_no_resume(origin: VersionedOrigin, make_upstream: Any) -> None:
    # Nothing would tell another version from this one: the break is final.
    origin.send_etag = origin.send_last_modified = origin.send_md5 = False
    origin.cuts = [300_000]
    upstream = make_upstream()
    with pytest.raises(UpstreamError) as caught:
        await collect(upstream, "img")
    assert not isinstance(caught.value, ResumeRefused)
    assert len(origin.gets) == 1


# --- bounded -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_retries_run_out_with_the_error_of_today(
    origin: VersionedOrigin, make_upstream: Any, path: str
) -> None:
    origin.cut_forever = 0  # every request: headers, then a reset
    upstream = make_upstream(attempts=3)
    with pytest.raises(UpstreamError, match="body failed after 0 bytes") as caught:
        await READERS[path](upstream, "img")
    assert not isinstance(caught.value, ResumeRefused)
    assert len(origin.gets) == 1 + 3


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_resume_off_is_todays_behaviour(
    origin: VersionedOrigin, make_upstream: Any, path: str
) -> None:
    origin.cuts = [300_000]
    upstream = make_upstream(attempts=0)
    with pytest.raises(UpstreamError, match="body failed after"):
        await READERS[path](upstream, "img")
    assert len(origin.gets) == 1


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_a_first_break_is_resumed_at_once_whatever_the_backoff(
    origin: VersionedOrigin, make_upstream: Any, path: str
) -> None:
    # On the WAN rig the default 0.5 s wait before the first resume was most of
    # what a reset cost the storm (docs/benchmarks-log.md): the first resume
    # does not wait; only a second break of the same body does.
    backoff = 10.0
    origin.cuts = [300_000]
    upstream = make_upstream(backoff=backoff)
    started = time.monotonic()
    assert await READERS[path](upstream, "img") == DATA
    assert time.monotonic() - started < backoff / 2
    assert len(origin.gets) == 2


async def test_interrupt_wakes_a_source_waiting_out_its_backoff(
    origin: VersionedOrigin, make_upstream: Any
) -> None:
    # The first break is resumed at once; the second one waits out the backoff.
    origin.cuts = [100_000, 100_000]
    upstream = make_upstream(backoff=BACKOFF_CAP)
    source = await upstream.open_source("img")
    assert source is not None
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            _read_all(source)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    # Both cuts happened once the origin finished the second GET (2 requests, cuts sent).
    await eventually(lambda: origin.body_bytes >= 200_000, "the origin has cut both GETs")
    started = time.monotonic()
    source.interrupt()
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert time.monotonic() - started < BACKOFF_CAP / 2
    assert len(outcome) == 1
    assert isinstance(outcome[0], UpstreamError)
    assert len(origin.gets) == 2  # woken in its backoff, before a second resume


@pytest.mark.parametrize("kind", ["http", "glance"])
async def test_a_released_source_reopens_at_its_offset_without_using_an_attempt(
    origin: VersionedOrigin, make_upstream: Any, kind: str
) -> None:
    if kind == "glance":
        origin.send_etag = origin.send_last_modified = False
        origin.chunked_whole = True
    # The first body is not cut (we release it), the second is: one attempt covers it.
    origin.cuts = [SIZE + 1, 200_000]
    events = RecordedResumes()
    upstream = make_upstream(kind, attempts=1, events=events)
    source = await upstream.open_source(image_id_for(kind))
    assert isinstance(source, Releasable)
    view = memoryview(bytearray(64 * 1024))
    count = await asyncio.to_thread(source.readinto, view)
    head = bytes(view[:count])
    assert source.release()
    assert not source.release()  # nothing left open to close
    rest = await asyncio.to_thread(_read_all, source)
    assert head + rest == DATA
    assert len(origin.gets) == 3
    assert origin.gets[1]["Range"].startswith(f"bytes={count}-")
    assert events.heard == ["resumed"]  # the break, not the release


# --- every resume's outcome goes to the events sink ----------------------------------------


@dataclass
class RecordedResumes:
    """A ``ResumeEvents`` sink that keeps what it heard (the pump calls it from its thread)."""

    heard: list[ResumeOutcome] = field(default_factory=list)

    def resume_outcome(self, outcome: ResumeOutcome) -> None:
        self.heard.append(outcome)


@pytest.mark.parametrize("path", ["stream", "open_source"])
@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("two breaks", ["resumed", "resumed"]),
        ("changed", ["refused"]),
        # Every connection carries 100 000 bytes: three resumes, then the attempts run out.
        ("always cut", ["resumed", "resumed", "resumed", "exhausted"]),
        ("resume off", []),
        ("no break", []),
    ],
)
async def test_each_resume_outcome_is_reported_to_the_sink(
    origin: VersionedOrigin, make_upstream: Any, path: str, scenario: str, expected: list[str]
) -> None:
    events = RecordedResumes()
    if scenario == "two breaks":
        origin.cuts = [300_000, 400_000]
    elif scenario == "changed":
        origin.cuts, origin.replace_on_cut = [300_000], OTHER
    elif scenario in ("always cut", "resume off"):
        origin.cut_forever = 100_000
    attempts = 0 if scenario == "resume off" else 3
    upstream = make_upstream(attempts=attempts, events=events)
    if scenario in ("two breaks", "no break"):
        assert await READERS[path](upstream, "img") == DATA
    else:
        with pytest.raises(UpstreamError):
            await READERS[path](upstream, "img")
    assert events.heard == expected


# --- through a whole fill of the service ---------------------------------------------------


@pytest.fixture
def make_client(
    aiohttp_client: Callable[[web.Application], Awaitable[TestClient[Any, Any]]],
    make_settings: Callable[..., Settings],
    origin: VersionedOrigin,
) -> Callable[..., Awaitable[TestClient[Any, Any]]]:
    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = make_settings(
            upstream=f"http:{origin.url}/images/{{image_id}}",
            upstream_resume_backoff=0,
            **overrides,
        )
        return await aiohttp_client(create_app(settings))

    return make


async def resumes_counted(client: TestClient[Any, Any]) -> dict[str, float]:
    """``imagecache_upstream_resumes_total`` by outcome, from the service's /metrics."""
    async with client.get("/metrics") as response:
        text = await response.text()
    found = re.findall(r'^imagecache_upstream_resumes_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    return {outcome: float(value) for outcome, value in found}


async def test_fill_resumes_and_commits_one_image(
    origin: VersionedOrigin, make_client: Any, cache_dir: Path
) -> None:
    origin.cuts = [250_000, 250_000]
    client = await make_client()
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        assert await response.read() == DATA
    await settled(client)
    assert (cache_dir / "img").read_bytes() == DATA
    assert SIZE <= origin.body_bytes < SIZE + 2 * 256 * 1024
    assert await resumes_counted(client) == {"resumed": 2, "refused": 0, "exhausted": 0}


async def test_fill_of_an_image_changed_mid_way_caches_nothing(
    origin: VersionedOrigin, make_client: Any, cache_dir: Path
) -> None:
    origin.cuts = [300_000]
    origin.replace_on_cut = OTHER
    client = await make_client()
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200  # the break came after the headers
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await settled(client)
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "incomplete") == []
    assert await resumes_counted(client) == {"resumed": 0, "refused": 1, "exhausted": 0}
    # The next request fills the new version afresh, whole: the refusal made the
    # cache forget what the origin had promised about the old one.
    async with client.get("/v2/images/img/file") as response:
        assert await response.read() == OTHER
    await settled(client)
    assert (cache_dir / "img").read_bytes() == OTHER


# --- s3: moto behind a cutter (the contract suite resumes whole bodies through it) ---------


async def test_s3_object_replaced_between_break_and_resume_is_refused(
    s3_server: Any,
    tcp_cutter: Callable[[str], Awaitable[Cutter]],
    make_settings: Callable[..., Settings],
    upstreams: list[Upstream],
) -> None:
    bucket = s3_server.new_bucket()
    before, after = image_bytes(3 * MiB, seed=21), image_bytes(3 * MiB, seed=22)
    s3_server.client.put_object(Bucket=bucket, Key="img", Body=before)
    cutter = await tcp_cutter(s3_server.endpoint_url)
    settings = make_settings(
        s3_endpoint_url=cutter.url,
        s3_region=s3_server.region,
        upstream_resume_attempts=5,
        upstream_resume_backoff=0,
    )
    upstream = create_upstream(f"s3:{bucket}", settings)
    upstreams.append(upstream)
    # Each connection carries at most 1.5 MiB: the 3 MiB body meets a cut after the
    # object is replaced, whichever connection the first MiB came through.
    cutter.cut_after = 3 * MiB // 2
    chunks = upstream.stream("img")
    body = aiter(chunks)
    first = await anext(body)
    assert before.startswith(first)
    await asyncio.to_thread(s3_server.client.put_object, Bucket=bucket, Key="img", Body=after)
    with pytest.raises(ResumeRefused, match="412"):
        async for _ in body:
            pass
    assert cutter.cuts >= 1
    await chunks.aclose()  # type: ignore[attr-defined]


# --- the decision itself -------------------------------------------------------------------


def test_no_wait_before_the_first_resume_then_the_backoff_doubles_to_its_cap() -> None:
    policy = ResumePolicy(attempts=10, backoff=0.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.0, 0.5, 1.0, 2.0]
    assert policy.delay(10) == BACKOFF_CAP


def test_validator_needs_a_length_and_something_that_names_the_version() -> None:
    assert Validator.of("i", 200, {"Content-Length": "10"}, None) is None
    chunked = {"Transfer-Encoding": "chunked", "Last-Modified": "Wed, 02 Dec 2026 10:00:00 GMT"}
    assert Validator.of("i", 200, chunked, None) is None  # no length, and only a date
    gzipped = {"ETag": '"a"', "Content-Length": "10", "Content-Encoding": "gzip"}
    assert Validator.of("i", 200, gzipped, None) is None
    weak = Validator.of("i", 200, {"ETag": 'W/"a"', "Content-Length": "10"}, None)
    assert weak is not None
    assert weak.http_headers(4) == {"Range": "bytes=4-9"}
    ranged = Validator.of("i", 206, {"ETag": '"a"', "Content-Range": "bytes 2-5/10"}, 6)
    assert ranged is not None
    assert ranged.http_headers(4) == {"Range": "bytes=4-5", "If-Range": '"a"'}


def test_a_chunked_body_named_by_its_md5_resumes_to_the_end() -> None:
    # Glance's whole-image download: chunked, no ETag, the image's md5.
    headers = {"Transfer-Encoding": "chunked", "Content-MD5": "0" * 32}
    validator = Validator.of("i", 200, headers, None)
    assert validator is not None
    assert validator.http_headers(4) == {"Range": "bytes=4-"}
    validator.check(206, {"Content-MD5": "0" * 32, "Content-Range": "bytes 4-9/10"}, 4)
    with pytest.raises(ResumeRefused, match="content-md5"):
        validator.check(206, {"Content-MD5": "1" * 32, "Content-Range": "bytes 4-9/10"}, 4)
    with pytest.raises(ResumeRefused, match="bytes 4-8"):
        validator.check(206, {"Content-MD5": "0" * 32, "Content-Range": "bytes 4-8/10"}, 4)


def test_validator_checks_start_end_total_and_etag() -> None:
    validator = Validator.of("i", 200, {"ETag": '"a"', "Content-Length": "10"}, None)
    assert validator is not None
    validator.check(206, {"ETag": '"a"', "Content-Range": "bytes 4-9/10"}, 4)
    for status, headers, match in [
        (200, {"ETag": '"a"'}, "HTTP 200"),
        (412, {}, "HTTP 412"),
        (206, {"ETag": '"a"', "Content-Range": "bytes 0-9/10"}, "bytes 0-9"),
        (206, {"ETag": '"a"', "Content-Range": "bytes 4-10/11"}, "now 11"),
        (206, {"ETag": '"b"', "Content-Range": "bytes 4-9/10"}, "ETag"),
        (206, {"Content-Range": "bytes 4-9/10"}, "ETag"),
    ]:
        with pytest.raises(ResumeRefused, match=match):
            validator.check(status, headers, 4)
    with pytest.raises(UpstreamError) as caught:
        validator.check(503, {}, 4)
    assert not isinstance(caught.value, ResumeRefused)  # worth another attempt
