"""Offline grace: hits served while a Glance origin cannot be asked, to callers it confirmed.

The rule is unit-tested on ``AccessCache`` with an injected clock; end to end,
the service runs against a real Glance (identity from trusted headers) of this
module's own, stopped mid-test to cut the origin and started again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from clocks import ManualClock
from imagecache.errors import (
    AccessUnconfirmed,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamUnreachable,
)
from imagecache.server.app import create_app
from imagecache.server.auth import Access, AccessCache
from imagecache.settings import Settings
from imagecache.upstreams.base import Caller
from peers.glance import GlancePeer, _start
from server_helpers import image_bytes, settled

DATA = image_bytes(300_000, seed=16)
ALICE = Caller({"X-Auth-Token": "token-alice"})
BOB = Caller({"X-Auth-Token": "token-bob"})
CAROL = Caller({"X-Auth-Token": "token-carol"})


class _Origin:
    """Stands in for an upstream's ``check_access`` only: these tests steer its answers
    and the clock exactly, which a real Glance cannot do; the end-to-end test below
    runs the same rule against a real one."""

    def __init__(self) -> None:
        self.allowed = {ALICE.cache_key()}
        self.down: UpstreamError | None = None
        self.asked = 0

    async def check_access(self, image_id: str, caller: Caller) -> None:
        self.asked += 1
        if self.down is not None:
            raise self.down
        if caller.cache_key() not in self.allowed:
            raise UpstreamForbidden(image_id)


def _cache(grace: float, ttl: float = 0.0) -> tuple[AccessCache, _Origin, ManualClock]:
    origin, clock = _Origin(), ManualClock()
    cache = AccessCache(origin, ttl, offline_grace=grace, clock=clock)  # type: ignore[arg-type]
    return cache, origin, clock


async def test_a_confirmed_caller_is_served_offline_within_the_grace_and_not_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, origin, clock = _cache(grace=60)
    assert await cache.check("img", ALICE, hit=True) is Access.CONFIRMED
    origin.down = UpstreamUnreachable("connection refused")
    clock.now += 59
    with caplog.at_level(logging.WARNING, logger="imagecache.server.auth"):
        for _ in range(3):  # within a second: one line, then the rest counted
            assert await cache.check("img", ALICE, hit=True) is Access.OFFLINE
        clock.now += 1
        assert await cache.check("img", ALICE, hit=True) is Access.OFFLINE
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2, lines
    assert "confirmed 59 s ago; connection refused (0 more" in lines[0]
    assert "(2 more such hits since the last line)" in lines[1]
    clock.now += 0.5
    with pytest.raises(AccessUnconfirmed, match="connection refused"):
        await cache.check("img", ALICE, hit=True)
    # Another image was never confirmed for this caller.
    with pytest.raises(AccessUnconfirmed):
        await cache.check("other", ALICE, hit=True)


async def test_never_confirmed_and_refused_callers_get_no_grace() -> None:
    cache, origin, clock = _cache(grace=3600)
    with pytest.raises(UpstreamForbidden):
        await cache.check("img", BOB, hit=True)
    # Bob was allowed once, then refused: the refusal ends his grace.
    origin.allowed.add(BOB.cache_key())
    await cache.check("img", BOB, hit=True)
    origin.allowed.discard(BOB.cache_key())
    with pytest.raises(UpstreamForbidden):
        await cache.check("img", BOB, hit=True)
    origin.down = UpstreamUnreachable("HTTP 503")
    clock.now += 1
    for caller in (BOB, CAROL):
        with pytest.raises(AccessUnconfirmed, match="offline_grace"):
            await cache.check("img", caller, hit=True)


async def test_only_an_unreachable_origin_opens_the_grace_and_only_for_hits() -> None:
    cache, origin, _ = _cache(grace=3600)
    await cache.check("img", ALICE)
    origin.down = UpstreamNotFound("img")  # an answer, not an outage
    with pytest.raises(UpstreamNotFound):
        await cache.check("img", ALICE, hit=True)
    origin.down = UpstreamError("HTTP 400")  # neither refused, timed out nor 5xx
    with pytest.raises(UpstreamError) as raised:
        await cache.check("img", ALICE, hit=True)
    assert not isinstance(raised.value, AccessUnconfirmed)
    origin.down = UpstreamUnreachable("timed out")
    with pytest.raises(UpstreamUnreachable):  # a miss needs the origin anyway
        await cache.check("img", ALICE)


async def test_without_a_grace_every_unchecked_hit_is_refused_and_the_origin_asked_again() -> None:
    cache, origin, _ = _cache(grace=0)
    await cache.check("img", ALICE, hit=True)
    origin.down = UpstreamUnreachable("connection refused")
    with pytest.raises(AccessUnconfirmed, match="offline_grace is 0"):
        await cache.check("img", ALICE, hit=True)
    origin.down = None
    asked = origin.asked
    assert await cache.check("img", ALICE, hit=True) is Access.CONFIRMED
    assert origin.asked == asked + 1


async def test_an_offline_answer_is_not_remembered() -> None:
    cache, origin, clock = _cache(grace=3600, ttl=30)
    await cache.check("img", ALICE, hit=True)
    clock.now += 31  # past auth_cache_ttl: the origin is asked
    origin.down = UpstreamUnreachable("connection refused")
    assert await cache.check("img", ALICE, hit=True) is Access.OFFLINE
    origin.down = None
    asked = origin.asked
    assert await cache.check("img", ALICE, hit=True) is Access.CONFIRMED
    assert origin.asked == asked + 1


# --- end to end, against a real Glance ------------------------------------------------


@pytest.fixture(scope="module")
def own_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlancePeer]:
    """A Glance of this module's own (trusted headers): the tests stop and restart it."""
    peer = _start(tmp_path_factory, "headers")
    try:
        yield peer
    finally:
        peer.stop()


async def test_a_cut_origin_refuses_every_hit_without_a_grace_and_serves_confirmed_callers_with_one(
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    own_glance: GlancePeer,
    tmp_path: Path,
) -> None:
    peer = own_glance
    owner = peer.headers_for("project-a")  # confirmed before the cut
    stranger = peer.headers_for("project-b")  # refused before the cut
    newcomer = peer.headers_for("project-c")  # never seen by the origin
    image_id = await asyncio.to_thread(peer.create_image, DATA, visibility="private", headers=owner)
    path = f"/v2/images/{image_id}/file"
    proxies: dict[str, TestClient[Any, Any]] = {}
    for name, grace in (("strict", 0), ("graceful", 3600)):
        settings = make_settings(
            upstream=f"glance:{peer.url}",
            auth_cache_ttl=0,
            offline_grace=grace,
            image_cache_dir=tmp_path / name,
            upstream_timeout=5,
        )
        proxies[name] = proxy = await aiohttp_client(create_app(settings))
        async with proxy.get(path, headers=owner) as response:
            assert (response.status, await response.read()) == (200, DATA)
        await settled(proxy)
        async with proxy.get(path, headers=owner) as response:
            assert response.headers["Cache-Status"] == "imagecache; hit"
            assert await response.read() == DATA
        async with proxy.get(path, headers=stranger) as response:
            assert response.status in (403, 404)

    await asyncio.to_thread(peer.stop)
    try:
        for headers in (owner, stranger, newcomer):
            async with proxies["strict"].get(path, headers=headers) as response:
                assert response.status == 503
                assert "cannot check this caller's access" in await response.text()
        graceful = proxies["graceful"]
        async with graceful.get(path, headers=owner) as response:
            assert response.status == 200
            assert response.headers["Cache-Status"] == "imagecache; hit; detail=offline"
            assert await response.read() == DATA
        for headers in (stranger, newcomer):
            async with graceful.get(path, headers=headers) as response:
                assert response.status == 503, headers
                assert "offline_grace" in await response.text()
        metrics = await (await graceful.get("/metrics")).text()
        assert "imagecache_offline_hits_total 1.0" in metrics
    finally:
        await asyncio.to_thread(peer.start)
    # The origin is back: the next hit asks it again (and a refusal is its answer).
    for proxy in proxies.values():
        async with proxy.get(path, headers=owner) as response:
            assert response.headers["Cache-Status"] == "imagecache; hit"
            assert await response.read() == DATA
        async with proxy.get(path, headers=stranger) as response:
            assert response.status in (403, 404)
