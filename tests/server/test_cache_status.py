"""``Cache-Status`` (RFC 9211) on image data, and the same value in the access log.

The origin is the ``http_origin`` peer (a real aiohttp server on loopback
whose bodies a test can hold at a gate); the service is a real aiohttp test
server with the production access logger.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from imagecache.server.app import AccessLogger, create_app
from imagecache.server.cache_status import Outcome, cache_status
from imagecache.server.state import STATE
from imagecache.settings import Settings
from polling import eventually
from server_helpers import ServeProcess, image_bytes, listdir, settled, start_serve

SIZE = 2 * 1024 * 1024 + 5
DATA = image_bytes(SIZE, seed=7)
PATH = "/v2/images/img/file"

HIT = "imagecache; hit"
STORED = "imagecache; fwd=miss; stored"
COLLAPSED = "imagecache; fwd=miss; collapsed"
MISS = "imagecache; fwd=miss"

_CACHE_FIELD = re.compile(r' request_id=(\S+) duration=[0-9.]+ cache=(-|"[^"]*")$')

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def make_client(
    aiohttp_client: Any, make_settings: Callable[..., Settings], http_origin: Any
) -> MakeClient:
    async def make(**overrides: Any) -> TestClient[Any, Any]:
        settings = make_settings(upstream="http:" + http_origin.template, **overrides)
        server = TestServer(create_app(settings))
        await server.start_server(
            access_log_class=AccessLogger, access_log=logging.getLogger("imagecache.access")
        )
        client: TestClient[Any, Any] = await aiohttp_client(server)
        return client

    return make


@pytest.fixture(autouse=True)
def _access_lines_captured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imagecache.access")


async def logged_cache(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    """The ``cache=`` field of the access line of ``request_id``, unquoted (``-``: none)."""

    def field() -> str | None:
        for record in caplog.records:
            match = _CACHE_FIELD.search(record.getMessage())
            if record.name == "imagecache.access" and match and match.group(1) == request_id:
                return match.group(2).strip('"')
        return None

    await eventually(lambda: field() is not None, f"the access line of {request_id} is logged")
    found = field()
    assert found is not None
    return found


async def status_of(caplog: pytest.LogCaptureFixture, response: aiohttp.ClientResponse) -> str:
    """The response's Cache-Status, checked to be what its access line says."""
    header = response.headers.get("Cache-Status", "-")
    logged = await logged_cache(caplog, response.headers["x-openstack-request-id"])
    assert logged == header, (logged, header)
    return header


async def fetch(
    client: TestClient[Any, Any],
    caplog: pytest.LogCaptureFixture,
    method: str = "GET",
    **headers: str,
) -> tuple[int, str, bytes]:
    async with client.request(method, PATH, headers=headers) as response:
        body = await response.read()
    return response.status, await status_of(caplog, response), body


def test_each_outcome_has_one_rfc_9211_value() -> None:
    assert cache_status(Outcome.HIT) == HIT
    assert cache_status(Outcome.STORED) == STORED
    assert cache_status(Outcome.COLLAPSED) == COLLAPSED
    assert cache_status(Outcome.MISS) == MISS
    assert cache_status(Outcome.BYPASS, "too_large") == "imagecache; fwd=bypass; detail=too_large"
    with pytest.raises(ValueError, match="reason"):
        cache_status(Outcome.BYPASS)


async def test_a_miss_says_stored_and_every_later_answer_says_hit(
    make_client: MakeClient, http_origin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    assert await fetch(client, caplog) == (200, STORED, DATA)
    await settled(client)
    assert await fetch(client, caplog) == (200, HIT, DATA)
    assert await fetch(client, caplog, "HEAD") == (200, HIT, b"")
    assert await fetch(client, caplog, Range="bytes=10-19") == (206, HIT, DATA[10:20])
    async with client.get(PATH) as response:
        etag = response.headers["ETag"]
        await response.read()
    # §2.1: a 304 the cache makes from its copy is a hit too.
    assert await fetch(client, caplog, **{"If-None-Match": etag}) == (304, HIT, b"")
    assert http_origin.body_reads("img") == 1


async def test_head_of_an_uncached_image_is_a_miss_that_stores_nothing(
    make_client: MakeClient, http_origin: Any, caplog: pytest.LogCaptureFixture, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client()
    assert await fetch(client, caplog, "HEAD") == (200, MISS, b"")
    assert not (cache_dir / "img").exists()
    assert http_origin.body_reads("img") == 0


async def test_a_client_joining_a_fill_in_flight_is_collapsed(
    make_client: MakeClient, http_origin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 3)
    client = await make_client()
    first = await client.get(PATH)
    head = await first.content.readany()  # the fill is under way, held at the gate
    second = await client.get(PATH)
    assert second.status == 200
    gate.set()
    assert head + await first.read() == DATA
    assert await second.read() == DATA
    assert await status_of(caplog, first) == STORED
    assert await status_of(caplog, second) == COLLAPSED
    assert http_origin.body_reads("img") == 1


async def test_a_range_served_from_a_fill_in_progress_is_collapsed(
    make_client: MakeClient, http_origin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 2)
    client = await make_client()
    whole = await client.get(PATH)
    head = await whole.content.readany()
    flight = client.app[STATE].fills.current("img")
    assert flight is not None
    assert await fetch(client, caplog, Range="bytes=100-199") == (206, COLLAPSED, DATA[100:200])
    gate.set()
    assert head + await whole.read() == DATA
    assert await status_of(caplog, whole) == STORED
    assert http_origin.body_reads("img") == 1


async def test_a_range_with_no_fill_to_follow_is_a_bypass(
    make_client: MakeClient, http_origin: Any, caplog: pytest.LogCaptureFixture, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    client = await make_client(range_starts_fill=False)
    got = await fetch(client, caplog, Range="bytes=0-9")
    assert got == (206, "imagecache; fwd=bypass; detail=range", DATA[:10])
    assert listdir(cache_dir / "incomplete") == []


async def test_an_image_too_large_to_cache_is_a_bypass_naming_the_reason(
    make_client: MakeClient, http_origin: Any, caplog: pytest.LogCaptureFixture, cache_dir: Path
) -> None:
    http_origin.add("img", DATA)
    # The largest cacheable image is max_image_fraction x image_cache_max_size.
    client = await make_client(image_cache_max_size=SIZE, max_image_fraction=0.5)
    too_large = "imagecache; fwd=bypass; detail=too_large"
    assert await fetch(client, caplog) == (200, too_large, DATA)
    assert await fetch(client, caplog) == (200, too_large, DATA)  # never cached, never a hit
    assert not (cache_dir / "img").exists()
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert 'imagecache_bypasses_total{reason="too_large"} 2.0' in metrics


async def test_a_client_joining_another_processes_fill_is_collapsed(
    make_client: MakeClient,
    http_origin: Any,
    caplog: pytest.LogCaptureFixture,
    cache_dir: Path,
    servers: list[ServeProcess],
) -> None:
    """A real ``imagecache serve`` over the same directory fills; this process follows it."""
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=SIZE // 3)
    other = await start_serve(cache_dir, "http:" + http_origin.template)
    servers.append(other)
    client = await make_client()
    async with aiohttp.ClientSession() as session, session.get(other.url + PATH) as first:
        assert first.headers["Cache-Status"] == STORED
        head = await first.content.readany()
        second = await client.get(PATH)
        assert second.status == 200
        gate.set()
        assert head + await first.read() == DATA
    assert await second.read() == DATA
    assert await status_of(caplog, second) == COLLAPSED
    assert http_origin.body_reads("img") == 1
