"""One contract, every upstream kind: http (a loopback origin), s3 (moto's server),
glance (a real Glance 33 API) and directory (local files).

Each kind's fixture builds the upstream the way an operator would
(``create_upstream("KIND:TARGET", settings)``) over a real socket, plus a way
to put an image at the origin. Mid-body failures go through ``tcp_cutter``, a
forwarder that resets the connection halfway, so every networked kind faces
the same real fault.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagecache.errors import UpstreamError, UpstreamNotFound
from imagecache.settings import Settings
from imagecache.upstreams import Upstream, create_upstream
from peers.cutter import Cutter
from peers.origin import Origin

KINDS = ["http", "s3", "glance", "directory"]
SIZE = 3 * 1024 * 1024 + 7  # several chunks of every transport, odd on purpose
CUT_AT = 1024 * 1024


@dataclass
class Kit:
    """An upstream of one kind and the means to arrange its origin."""

    kind: str
    upstream: Upstream
    put: Callable[[bytes], str]  # stores an image at the origin, returns its id
    missing_id: str
    # An upstream behind a cutter, resuming a broken body at most this many times.
    via_cutter: Callable[[int], Awaitable[tuple[Upstream, Cutter]]] | None
    promises_checksum: bool  # the origin always states a checksum


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.fixture(params=KINDS)
async def kit(
    request: pytest.FixtureRequest,
    make_settings: Callable[..., Settings],
    tcp_cutter: Callable[[str], Awaitable[Cutter]],
    http_origin: Origin,  # cheap; async fixtures cannot be fetched by name from here
    tmp_path: Path,
) -> AsyncIterator[Kit]:
    kind: str = request.param
    settings = make_settings()
    built: list[Upstream] = []

    def resuming(attempts: int) -> Settings:
        # No backoff: the cutter resets at once, there is nothing to wait out.
        return make_settings(upstream_resume_attempts=attempts, upstream_resume_backoff=0)

    def make(spec: str, with_settings: Settings = settings) -> Upstream:
        upstream = create_upstream(spec, with_settings)
        built.append(upstream)
        return upstream

    if kind == "http":
        origin = http_origin

        def put(data: bytes) -> str:
            image_id = secrets.token_hex(8)
            origin.add(image_id, data)
            return image_id

        async def cut_http(attempts: int) -> tuple[Upstream, Cutter]:
            cutter = await tcp_cutter(origin.url)
            spec = "http:" + origin.template.replace(origin.url, cutter.url)
            return make(spec, resuming(attempts)), cutter

        result = Kit(kind, make("http:" + origin.template), put, "absent", cut_http, True)
    elif kind == "s3":
        s3 = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()

        def s3_settings(endpoint: str, attempts: int = 0) -> Settings:
            return make_settings(
                s3_endpoint_url=endpoint,
                s3_region=s3.region,
                upstream_resume_attempts=attempts,
                upstream_resume_backoff=0,
            )

        def put(data: bytes) -> str:
            image_id = secrets.token_hex(8)
            s3.client.put_object(Bucket=bucket, Key=f"images/{image_id}", Body=data)
            return image_id

        async def cut_s3(attempts: int) -> tuple[Upstream, Cutter]:
            cutter = await tcp_cutter(s3.endpoint_url)
            return make(f"s3:{bucket}/images", s3_settings(cutter.url, attempts)), cutter

        upstream = make(f"s3:{bucket}/images", s3_settings(s3.endpoint_url))
        result = Kit(kind, upstream, put, "absent", cut_s3, True)
    elif kind == "glance":
        peer = request.getfixturevalue("glance_peer")

        async def cut_glance(attempts: int) -> tuple[Upstream, Cutter]:
            cutter = await tcp_cutter(peer.url)
            return make("glance:" + cutter.url, resuming(attempts)), cutter

        missing = "00000000-0000-4000-8000-000000000000"
        result = Kit(kind, make("glance:" + peer.url), peer.create_image, missing, cut_glance, True)
    else:
        if importlib.util.find_spec("imagecache.upstreams.directory") is None:
            pytest.skip("imagecache.upstreams.directory does not exist yet")
        root = tmp_path / "origin"
        root.mkdir()

        def put(data: bytes) -> str:
            image_id = secrets.token_hex(8)
            (root / image_id).write_bytes(data)
            return image_id

        result = Kit(kind, make(f"directory:{root}"), put, "absent", None, False)
    yield result
    for upstream in built:
        await upstream.close()


@pytest.fixture(scope="module")
def image() -> bytes:
    return secrets.token_bytes(SIZE)


async def test_info_states_size_and_checksums(kit: Kit, image: bytes) -> None:
    image_id = kit.put(image)
    info = await kit.upstream.info(image_id)
    assert info.image_id == image_id
    assert info.size == len(image)
    assert info.status == "active"
    if kit.promises_checksum:
        assert info.checksum is not None or info.hash_value is not None
    if info.checksum is not None:
        assert info.checksum == hashlib.md5(image).hexdigest()
    if info.hash_algo is not None:
        assert info.hash_value == hashlib.new(info.hash_algo, image).hexdigest()


async def test_stream_whole_image(kit: Kit, image: bytes) -> None:
    image_id = kit.put(image)
    assert await collect(kit.upstream.stream(image_id)) == image


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 1), (SIZE - 1, None), (CUT_AT + 3, None), (100, 200_100), (CUT_AT - 5, CUT_AT + 5)],
)
async def test_stream_range(kit: Kit, image: bytes, start: int, end: int | None) -> None:
    image_id = kit.put(image)
    assert await collect(kit.upstream.stream(image_id, start=start, end=end)) == image[start:end]


async def test_unknown_image(kit: Kit) -> None:
    with pytest.raises(UpstreamNotFound):
        await kit.upstream.info(kit.missing_id)
    with pytest.raises(UpstreamNotFound):
        await collect(kit.upstream.stream(kit.missing_id))


async def test_an_origin_that_answers_is_reachable(kit: Kit) -> None:
    detail = await kit.upstream.check_reachable()
    assert detail
    assert "no check" not in detail  # every kind we ship says what it checked


async def test_stream_closed_early_leaves_upstream_usable(kit: Kit, image: bytes) -> None:
    image_id = kit.put(image)
    chunks = kit.upstream.stream(image_id)
    first = await anext(aiter(chunks))
    assert image.startswith(first)
    await chunks.aclose()  # type: ignore[attr-defined]
    assert await collect(kit.upstream.stream(image_id, start=SIZE - 10)) == image[-10:]


async def test_reset_mid_body_is_an_upstream_error(kit: Kit, image: bytes) -> None:
    if kit.via_cutter is None:
        pytest.skip(f"{kit.kind} has no network to fail")
    image_id = kit.put(image)
    upstream, cutter = await kit.via_cutter(0)  # resume off: the break is the error
    await upstream.info(image_id)  # metadata passes untouched
    cutter.cut_after = CUT_AT
    received = bytearray()

    async def drain() -> None:
        async for chunk in upstream.stream(image_id):
            received.extend(chunk)

    with pytest.raises(UpstreamError):
        await drain()
    assert cutter.cuts >= 1
    assert len(received) < len(image)
    assert image.startswith(bytes(received))


# --- open_source: the whole image for the fill pump, read with blocking calls -----------------


async def drain_source(upstream: Upstream, image_id: str, into: bytearray) -> None:
    """Read ``open_source`` to its end into ``into`` (in a thread, as the pump does)."""
    source = await upstream.open_source(image_id)
    assert source is not None, f"{upstream.kind} offers no blocking source"

    def pump() -> None:
        buffer = bytearray(1024 * 1024)
        view = memoryview(buffer)
        try:
            while count := source.readinto(view):
                into.extend(view[:count])
        finally:
            source.close()

    await asyncio.to_thread(pump)


async def test_open_source_reads_the_whole_image(kit: Kit, image: bytes) -> None:
    image_id = kit.put(image)
    received = bytearray()
    await drain_source(kit.upstream, image_id, received)
    assert bytes(received) == image


async def test_open_source_of_an_unknown_image_is_not_found(kit: Kit) -> None:
    with pytest.raises(UpstreamNotFound):
        await kit.upstream.open_source(kit.missing_id)


async def test_open_source_reset_mid_body_is_an_upstream_error(kit: Kit, image: bytes) -> None:
    if kit.via_cutter is None:
        pytest.skip(f"{kit.kind} has no network to fail")
    image_id = kit.put(image)
    upstream, cutter = await kit.via_cutter(0)  # resume off: the break is the error
    cutter.cut_after = CUT_AT
    received = bytearray()
    with pytest.raises(UpstreamError):
        await drain_source(upstream, image_id, received)
    assert cutter.cuts >= 1
    assert len(received) < len(image)
    assert image.startswith(bytes(received))


# --- resuming a broken body (upstreams/resume.py) ------------------------------------------
# The cutter closes every connection after CUT_AT bytes (headers included),
# cleanly: a reset discards what the client had received but not yet read, and
# boto3 reads slowly enough that a resumed s3 body could then make no progress
# at all (resets are resumed against the http origin in test_upstream_resume.py).
# So each resume brings a little under CUT_AT more: the image needs four.


@pytest.mark.parametrize("path", ["stream", "open_source"])
async def test_reset_mid_body_is_resumed_into_the_whole_image(
    kit: Kit, image: bytes, path: str
) -> None:
    if kit.via_cutter is None:
        pytest.skip(f"{kit.kind} has no network to fail")
    image_id = kit.put(image)
    upstream, cutter = await kit.via_cutter(5)
    await upstream.info(image_id)
    cutter.cut_after, cutter.reset = CUT_AT, False
    if path == "stream":
        received = bytearray(await collect(upstream.stream(image_id)))
    else:
        received = bytearray()
        await drain_source(upstream, image_id, received)
    assert cutter.cuts >= 3
    assert bytes(received) == image


async def test_resumed_range_stays_within_the_range(kit: Kit, image: bytes) -> None:
    if kit.via_cutter is None:
        pytest.skip(f"{kit.kind} has no network to fail")
    image_id = kit.put(image)
    upstream, cutter = await kit.via_cutter(5)
    cutter.cut_after, cutter.reset = CUT_AT, False
    start, end = 1000, SIZE - 1000
    assert await collect(upstream.stream(image_id, start=start, end=end)) == image[start:end]
    assert cutter.cuts >= 1
