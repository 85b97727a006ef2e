"""Edge autonomy (issue 16), on the WAN rig: a site whose link to its Glance is cut.

A real Glance (trusted identity headers, stock RBAC policy) runs inside a
rig namespace, reached only through the project's relay across a shaped veth
link; the edge is real ``imagecache serve`` processes. The cut is the relay's
black hole, a partition: connections hang rather than being refused, so
every access check ends in the upstream timeout (kept short here). The rule
itself (``AccessCache``) and the same story on loopback with Glance stopped
are in tests/server/test_offline_grace.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import pytest

from peers.glance import GlancePeer, _start
from peers.relay import RelayProcess
from peers.wan import WanRig
from server_helpers import ServeProcess, image_bytes, poll, start_serve

pytestmark = pytest.mark.timeout(120)  # a cold Glance start is most of it
DATA = image_bytes(1024 * 1024 + 7, seed=16)
DELAY = 0.02  # one way: 40 ms round trip
LINK_MBIT = 100
HIT = "imagecache; hit"
OFFLINE_HIT = "imagecache; hit; detail=offline"


@pytest.fixture
def far_glance(
    wan_rig: WanRig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GlancePeer, RelayProcess]]:
    """A Glance in its own namespace and the relay in front of it, on the far end of the link.

    The relay runs in the namespace too (Glance binds that namespace's
    loopback), listening on the link's address: edge -> veth (shaped) ->
    relay (delay, black hole) -> Glance. The peer's own helpers (image
    create, upload) take the same way.
    """
    host = wan_rig.add_host("g", mbit=LINK_MBIT)
    peer = _start(tmp_path_factory, "headers", netns=host.name)
    try:
        target = ("127.0.0.1", int(peer.env["GLANCE_PEER_PORT"]))
        with RelayProcess(target, delay=DELAY, listen=host.address, netns=host.name) as relay:
            peer.url = relay.url
            yield peer, relay
    finally:
        peer.stop()


async def get(
    server: ServeProcess, path: str, headers: Mapping[str, str]
) -> tuple[int, str, bytes]:
    """(status, Cache-Status, body) of one GET."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.url + path, headers=dict(headers)) as response,
    ):
        return response.status, response.headers.get("Cache-Status", ""), await response.read()


async def offline_hits(server: ServeProcess) -> float:
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
        text = await response.text()
    line = next(x for x in text.splitlines() if x.startswith("imagecache_offline_hits_total "))
    return float(line.split()[-1])


async def test_a_cut_link_refuses_hits_without_a_grace_and_serves_only_confirmed_callers_with_one(
    far_glance: tuple[GlancePeer, RelayProcess], tmp_path: Path, servers: list[ServeProcess]
) -> None:
    peer, relay = far_glance
    owner = peer.headers_for("project-a")  # confirmed before the cut
    stranger = peer.headers_for("project-b")  # refused before the cut
    newcomer = peer.headers_for("project-c")  # never seen by the origin
    image_id = await asyncio.to_thread(peer.create_image, DATA, visibility="private", headers=owner)
    path = f"/v2/images/{image_id}/file"
    checks = f"GET {path}"  # the access check of a hit: a ranged GET of the file route
    edges: dict[str, ServeProcess] = {}
    for name, grace in (("strict", 0), ("graceful", 3600)):
        env = {
            "IMAGECACHE_AUTH_CACHE_TTL": "0",  # every hit asks: the cut is seen at once
            "IMAGECACHE_OFFLINE_GRACE": str(grace),
            "IMAGECACHE_UPSTREAM_TIMEOUT": "1",
        }
        edges[name] = edge = await start_serve(tmp_path / name, f"glance:{relay.url}", env=env)
        servers.append(edge)
        status, _, body = await get(edge, path, owner)
        assert (status, body) == (200, DATA)

        async def committed(cache: Path = tmp_path / name) -> bool:
            return (cache / image_id).exists()

        await poll(committed, f"the {name} edge cached the image")
        assert await get(edge, path, owner) == (200, HIT, DATA)
        status, _, _ = await get(edge, path, stranger)
        assert status in (403, 404), status

    before = await asyncio.to_thread(peer.logged_requests, checks)
    relay.blackhole()
    strict, graceful = edges["strict"], edges["graceful"]
    callers = (owner, stranger, newcomer)
    answers = await asyncio.gather(
        *(get(strict, path, who) for who in callers), *(get(graceful, path, who) for who in callers)
    )
    for status, _, body in answers[:3]:
        assert status == 503
        assert b"cannot check this caller's access" in body, body
    assert answers[3] == (200, OFFLINE_HIT, DATA)
    for status, _, body in answers[4:]:
        assert status == 503
        assert b"offline_grace" in body, body
    assert await offline_hits(graceful) == 1
    assert await offline_hits(strict) == 0
    assert await asyncio.to_thread(peer.logged_requests, checks) == before, "the link was cut"

    relay.restore()

    # The black hole held the six checks sent into it (as a partition holds
    # what TCP retransmits): they reach Glance now. Wait for them, so that the
    # count below is the next hit's alone.
    async def held_checks_arrived() -> bool:
        return await asyncio.to_thread(peer.logged_requests, checks) >= before + 6

    await poll(held_checks_arrived, "the checks held by the black hole reached Glance", within=10)
    held = await asyncio.to_thread(peer.logged_requests, checks)
    assert held == before + 6, "one check per hit during the cut, no retries"
    for edge in (strict, graceful):
        seen = await asyncio.to_thread(peer.logged_requests, checks)
        assert await get(edge, path, owner) == (200, HIT, DATA)

        async def asked(seen: int = seen) -> bool:
            # gunicorn writes the line once its answer is out: a moment after we have it.
            return await asyncio.to_thread(peer.logged_requests, checks) > seen

        await poll(asked, "Glance logged the hit's access check", within=5)
        assert await asyncio.to_thread(peer.logged_requests, checks) == seen + 1
        status, _, _ = await get(edge, path, stranger)
        assert status in (403, 404), status
    assert await offline_hits(graceful) == 1
