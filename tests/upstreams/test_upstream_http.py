"""The http upstream against a real origin on loopback: what only http does.

The behaviour every upstream shares is in ``test_upstream_contract.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from imagecache.errors import ConfigurationError, UpstreamError, UpstreamNotFound
from imagecache.settings import Settings
from imagecache.upstreams import create_upstream
from imagecache.upstreams.http import HttpUpstream, _digest_from, _md5_from
from imagecache.upstreams.http_source import open_get
from peers.origin import Fault, Origin

DATA = bytes(range(256)) * 1000  # 256000 bytes, several origin chunks


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.fixture
async def upstream(
    http_origin: Origin, make_settings: Callable[..., Settings]
) -> AsyncIterator[HttpUpstream]:
    # Resume off: these tests see each fault as it is (test_upstream_resume.py resumes).
    built = create_upstream(
        "http:" + http_origin.template, make_settings(upstream_resume_attempts=0)
    )
    assert isinstance(built, HttpUpstream)
    yield built
    await built.close()


def test_factory_rejects_unknown_kind(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match="'ftp'"):
        create_upstream("ftp:host/x", make_settings())


def test_factory_rejects_missing_target(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match="KIND:TARGET"):
        create_upstream("http:", make_settings())


def test_template_must_name_the_image(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigurationError, match=r"\{image_id\}"):
        create_upstream("http:http://origin/images/", make_settings())


async def test_short_body_is_an_error(http_origin: Origin, upstream: HttpUpstream) -> None:
    http_origin.add("img", DATA)
    http_origin.fail("img", Fault.SHORT, after=70_000)
    got = bytearray()

    async def drain() -> None:
        async for chunk in upstream.stream("img"):
            got.extend(chunk)

    with pytest.raises(UpstreamError, match=r"70000 of 256000|payload"):
        await drain()
    assert len(got) <= 70_000
    assert DATA.startswith(bytes(got))


async def test_head_refused_falls_back_to_first_byte(
    http_origin: Origin, upstream: HttpUpstream
) -> None:
    http_origin.add("img", DATA)
    http_origin.allow_head = False
    info = await upstream.info("img")
    assert info.size == len(DATA)
    assert info.checksum == hashlib.md5(DATA).hexdigest()
    methods = [(method, headers.get("Range")) for method, _, headers in http_origin.requests]
    assert methods == [("HEAD", None), ("GET", "bytes=0-0")]


async def test_origin_ignoring_range_still_yields_the_range(
    http_origin: Origin, upstream: HttpUpstream
) -> None:
    http_origin.add("img", DATA, honour_range=False)
    assert (
        await collect(upstream.stream("img", start=100_000, end=100_010)) == DATA[100_000:100_010]
    )
    assert await collect(upstream.stream("img", start=200_000)) == DATA[200_000:]


async def test_empty_range_makes_no_request(http_origin: Origin, upstream: HttpUpstream) -> None:
    http_origin.add("img", DATA)
    assert await collect(upstream.stream("img", start=5, end=5)) == b""
    assert http_origin.requests == []


async def test_sidecars_give_the_multihash(
    http_origin: Origin, make_settings: Callable[..., Settings]
) -> None:
    http_origin.add("img", DATA, sidecars=("sha256", "md5"), content_md5=False)
    upstream = create_upstream(
        "http:" + http_origin.template, make_settings(http_checksum_sidecar=True)
    )
    try:
        info = await upstream.info("img")
    finally:
        await upstream.close()
    assert info.hash_algo == "sha256"
    assert info.hash_value == hashlib.sha256(DATA).hexdigest()
    assert info.checksum == hashlib.md5(DATA).hexdigest()


async def test_sidecars_off_by_default(http_origin: Origin, upstream: HttpUpstream) -> None:
    http_origin.add("img", DATA, sidecars=("sha512",))
    info = await upstream.info("img")
    assert info.hash_algo is None
    assert all(not path.endswith(".sha512") for _, path, _ in http_origin.requests)


async def test_unreachable_origin_is_an_upstream_error(
    make_settings: Callable[..., Settings],
) -> None:
    # A port that was just free: connecting is refused at once.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    upstream = create_upstream(f"http:http://127.0.0.1:{port}/{{image_id}}", make_settings())
    try:
        with pytest.raises(UpstreamError) as info_error:
            await upstream.info("img")
        assert not isinstance(info_error.value, UpstreamNotFound)
        with pytest.raises(UpstreamError):
            await collect(upstream.stream("img"))
    finally:
        await upstream.close()


def test_content_md5_hex_and_base64() -> None:
    digest = hashlib.md5(b"x").digest()
    assert _md5_from({"Content-MD5": digest.hex().upper()}) == digest.hex()
    assert _md5_from({"Content-MD5": base64.b64encode(digest).decode()}) == digest.hex()
    assert _md5_from({"Content-MD5": "not-a-digest"}) is None
    assert _md5_from({"x-image-meta-checksum": digest.hex()}) == digest.hex()


def test_repr_digest_prefers_sha512() -> None:
    sha256 = base64.b64encode(hashlib.sha256(b"x").digest()).decode()
    sha512 = base64.b64encode(hashlib.sha512(b"x").digest()).decode()
    header = {"Repr-Digest": f"sha-256=:{sha256}:, sha-512=:{sha512}:"}
    assert _digest_from(header) == ("sha512", hashlib.sha512(b"x").hexdigest())
    assert _digest_from({"Digest": f"SHA-256={sha256}"}) == (
        "sha256",
        hashlib.sha256(b"x").hexdigest(),
    )
    assert _digest_from({"Repr-Digest": "sha-256=:bm90:"}) == (None, None)


async def test_origin_reset_hook_is_an_upstream_error(
    http_origin: Origin, upstream: HttpUpstream
) -> None:
    http_origin.add("img", DATA)
    http_origin.fail("img", Fault.RESET, after=100_000)
    with pytest.raises(UpstreamError):
        await collect(upstream.stream("img"))
    http_origin.fail("img", None)
    assert await collect(upstream.stream("img")) == DATA
    assert http_origin.body_reads("img") == 2


async def test_origin_gate_holds_the_body_until_set(
    http_origin: Origin, upstream: HttpUpstream
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=1000)
    chunks = upstream.stream("img")
    received = bytearray()
    while len(received) < 1000:
        received.extend(await anext(aiter(chunks)))
    assert bytes(received) == DATA[:1000]
    # Nothing more flows while the gate is shut (a bounded wait proving a negative).
    pending = asyncio.ensure_future(anext(aiter(chunks)))
    done, _ = await asyncio.wait({pending}, timeout=0.2)
    assert not done
    assert http_origin.bytes_sent("img") == 1000
    gate.set()
    received.extend(await pending)
    async for chunk in chunks:
        received.extend(chunk)
    assert bytes(received) == DATA
    assert http_origin.body_reads("img") == 1


# --- open_source (http_source): the fill pump's blocking reads -----------------------------


async def test_open_source_returns_what_has_arrived_without_waiting_for_a_full_buffer(
    http_origin: Origin, upstream: HttpUpstream
) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB
    http_origin.add("img", data)
    gate = http_origin.gate("img", after=100_000)
    source = await upstream.open_source("img")
    view = memoryview(bytearray(1024 * 1024))
    try:
        # Followers must see a slow origin's bytes as they come, not per full buffer.
        first = await asyncio.wait_for(asyncio.to_thread(source.readinto, view), timeout=10)
        assert 0 < first <= 100_000
        received = bytearray(view[:first])
        gate.set()
        while count := await asyncio.to_thread(source.readinto, view):
            received += view[:count]
        assert bytes(received) == data
    finally:
        gate.set()
        source.close()


async def test_open_source_short_body_is_an_error(
    http_origin: Origin, upstream: HttpUpstream
) -> None:
    http_origin.add("img", DATA)
    http_origin.fail("img", Fault.SHORT, after=70_000)
    source = await upstream.open_source("img")
    view = memoryview(bytearray(64 * 1024))

    def drain() -> None:
        while source.readinto(view):
            pass

    try:
        with pytest.raises(UpstreamError, match="body failed after 70000 bytes"):
            await asyncio.to_thread(drain)
    finally:
        source.close()


async def test_redirects_are_followed_and_identity_stays_with_its_origin(
    aiohttp_server: Any, http_origin: Origin
) -> None:
    http_origin.add("img", DATA)
    seen: list[dict[str, str]] = []

    async def same_origin(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        raise web.HTTPFound(f"/elsewhere/{request.match_info['name']}")

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        raise web.HTTPTemporaryRedirect(http_origin.template.replace("{image_id}", "img"))

    app = web.Application()
    app.router.add_get("/start/{name}", same_origin)
    app.router.add_get("/elsewhere/{name}", elsewhere)
    server = await aiohttp_server(app)
    headers = {"X-Auth-Token": "secret-token", "Accept-Encoding": "identity"}
    url = str(server.make_url("/start/img"))
    source = await asyncio.to_thread(open_get, url, headers, 5.0, "img")
    view = memoryview(bytearray(1024 * 1024))
    received = bytearray()
    try:
        while count := await asyncio.to_thread(source.readinto, view):
            received += view[:count]
    finally:
        source.close()
    assert bytes(received) == DATA
    # The token went to both hops of the configured origin, never to the other one.
    assert [hop.get("X-Auth-Token") for hop in seen] == ["secret-token", "secret-token"]
    method, _, final = http_origin.requests[-1]
    assert method == "GET"
    assert "X-Auth-Token" not in final


async def test_a_redirect_loop_is_an_upstream_error(aiohttp_server: Any) -> None:
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/again")

    app = web.Application()
    app.router.add_get("/again", loop)
    server = await aiohttp_server(app)
    with pytest.raises(UpstreamError, match="redirects"):
        await asyncio.to_thread(open_get, str(server.make_url("/again")), {}, 5.0, "img")


async def test_every_request_of_the_http_upstream_follows_a_redirect(
    aiohttp_server: Any, http_origin: Origin, make_settings: Callable[..., Settings]
) -> None:
    """HEAD (the size), sidecars (the hash), whole and ranged GETs, and a download
    through the service, all through a front that only redirects to the origin."""
    http_origin.add("img", DATA, sidecars=("sha256",))

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(http_origin.image_url(request.match_info["name"]))

    app = web.Application()
    app.router.add_route("*", "/images/{name}", moved)
    front = await aiohttp_server(app)
    template = str(front.make_url("/images/")) + "{image_id}"
    upstream = create_upstream("http:" + template, make_settings(http_checksum_sidecar=True))
    try:
        info = await upstream.info("img")
        assert info.size == len(DATA)  # not the redirect's own Content-Length
        assert (info.hash_algo, info.hash_value) == ("sha256", hashlib.sha256(DATA).hexdigest())
        assert await collect(upstream.stream("img")) == DATA
        assert await collect(upstream.stream("img", start=1000, end=5000)) == DATA[1000:5000]
    finally:
        await upstream.close()
    methods = [method for method, path, _ in http_origin.requests if path == "/images/img"]
    assert methods[:1] == ["HEAD"]


async def test_a_download_through_a_redirecting_http_origin_is_served_whole(
    aiohttp_server: Any, aiohttp_client: Any, http_origin: Origin, make_settings: Any
) -> None:
    from imagecache.server.app import create_app

    http_origin.add("img", DATA)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(http_origin.image_url(request.match_info["name"]))

    app = web.Application()
    app.router.add_route("*", "/images/{name}", moved)
    front = await aiohttp_server(app)
    template = str(front.make_url("/images/")) + "{image_id}"
    client = await aiohttp_client(create_app(make_settings(upstream="http:" + template)))
    async with client.get("/v2/images/img/file") as response:
        assert response.status == 200
        assert response.content_length == len(DATA)
        assert await response.read() == DATA


async def test_sidecars_are_asked_beside_the_head_not_after_it(
    make_settings: Callable[..., Settings],
) -> None:
    """The HEAD is answered only once a sidecar request has arrived: asked one
    after the other (a round trip each across a WAN), the HEAD never answers."""
    sidecar_asked = asyncio.Event()

    async def head(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(sidecar_asked.wait(), 5)
        except TimeoutError:
            return web.Response(status=503, text="no sidecar request came while the HEAD waited")
        return web.Response(headers={"Content-Length": str(len(DATA))})

    async def sidecar(request: web.Request) -> web.Response:
        sidecar_asked.set()
        if request.match_info["algo"] != "sha256":
            return web.Response(status=404)
        return web.Response(text=hashlib.sha256(DATA).hexdigest())

    app = web.Application()
    app.router.add_route("HEAD", "/img", head)
    app.router.add_get("/img.{algo}", sidecar)
    server = TestServer(app)
    await server.start_server()
    upstream = create_upstream(
        f"http:{str(server.make_url('')).rstrip('/')}/{{image_id}}",
        make_settings(http_checksum_sidecar=True),
    )
    try:
        info = await upstream.info("img")
    finally:
        await upstream.close()
        await server.close()
    assert info.size == len(DATA)
    assert (info.hash_algo, info.hash_value) == ("sha256", hashlib.sha256(DATA).hexdigest())


async def test_a_failed_head_cancels_the_sidecar_requests(
    http_origin: Origin, make_settings: Callable[..., Settings]
) -> None:
    upstream = create_upstream(
        "http:" + http_origin.template, make_settings(http_checksum_sidecar=True)
    )
    try:
        with pytest.raises(UpstreamNotFound):
            await upstream.info("nosuch")
    finally:
        await upstream.close()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not [t for t in pending if "_read_sidecars" in repr(t.get_coro())], pending


async def test_closing_a_source_closes_its_connection_on_a_connection_close_answer(
    aiohttp_server: Any,
) -> None:
    # http.client hands a "Connection: close" answer's socket to the response,
    # so closing the connection alone left the socket open (a paused background
    # fill's release, fill/pump.py, would not have freed the link).
    ended = asyncio.Event()
    piece = b"x" * (64 * 1024)

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Connection": "close"})
        response.content_length = 1024 * len(piece)  # more than the socket buffers hold
        response.force_close()
        await response.prepare(request)
        try:
            for _ in range(1024):
                await response.write(piece)
        finally:  # the client went: a write failed, or aiohttp cancelled the handler
            ended.set()
        return response

    app = web.Application()
    app.router.add_get("/img", handle)
    server = await aiohttp_server(app)
    source = await asyncio.to_thread(open_get, str(server.make_url("/img")), {}, 5.0, "img")
    assert source.headers.get("Connection") == "close"
    assert await asyncio.to_thread(source.readinto, memoryview(bytearray(len(piece)))) > 0
    source.close()
    try:
        await asyncio.wait_for(ended.wait(), 5.0)
    finally:
        del source  # where close() does not, freeing the response closes the socket
