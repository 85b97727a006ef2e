"""A paused background fill closes its origin connection and resumes it with a Range request.

Real parts: the service's app (aiohttp test server), the queue worker fed by
``PUT /v2/cache/{id}``, the http upstream read by the fill pump's thread, and
the ``http_origin`` peer on a loopback socket, paced so that the background
fill is mid-body when a client comes. The one held point is the decision of
the client's fill (a fill hook), which keeps the background fill paused for
as long as the test needs; the rest is observed by polling with deadlines.

Without the release, the paused fill's connection stays open and the origin
goes on sending into the socket buffers: the body is never cut short.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient

from imagecache.server.cache_api import WORKER
from imagecache.server.state import STATE
from peers.origin import Origin, OriginImage
from server_helpers import image_bytes, poll
from test_background_bandwidth import ADMIN, TOKEN, HoldDecision, get, sample

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MiB = 1024 * 1024
BACKGROUND = image_bytes(8 * MiB, seed=41)
USER = image_bytes(256 * 1024, seed=42)
RELEASED = "imagecache_background_connections_released_total"


async def _true(value: bool) -> bool:
    return value


@dataclass
class Paused:
    """A background fill paused mid-body by a client held waiting, its connection released."""

    client: TestClient[Any, Any]
    state: OriginImage
    hooks: HoldDecision
    user: asyncio.Task[bytes]
    cut_at: int  # body bytes the origin sent before the connection ended


async def pause_mid_body(make_client: MakeClient, http_origin: Origin) -> Paused:
    state = http_origin.add("background", BACKGROUND, sidecars=("sha256",))
    # 8 MiB at 4 MiB/s: about 2 s whole, so the pause below comes mid-body.
    state.rate = 4 * MiB
    http_origin.add("user", USER, sidecars=("sha256",))
    hooks = HoldDecision("user")
    client = await make_client(
        fill_hooks=hooks, admin_token=TOKEN, background_bandwidth_while_busy=0
    )
    async with client.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await poll(
        lambda: _true(sample(client, "imagecache_background_bytes_total") >= MiB),
        "the background fill is 1 MiB in",
    )
    user = asyncio.create_task(get(client, "user"))
    await poll(lambda: _true(hooks.entered.is_set()), "the client's fill is being decided")
    assert client.app[STATE].fills.bandwidth.rate == 0
    # The origin sees the paused fill's connection end before the body is out.
    await poll(lambda: _true(state.bodies_ended >= 1), "the origin sees the connection end")
    cut_at = http_origin.bytes_sent("background")
    assert cut_at < len(BACKGROUND), "the whole body was sent: the connection stayed open"
    assert sample(client, RELEASED) == 1
    return Paused(client, state, hooks, user, cut_at)


async def change_and_resume(
    http_origin: Origin,
    client: TestClient[Any, Any],
    hooks: HoldDecision,
    user: asyncio.Task[bytes],
    seed: int,
) -> bytes:
    """Replace the paused image (same size, other bytes and Content-MD5), end the pause.

    Returns the new bytes once the client's download and the queue are done.
    """
    size = len((http_origin.root / "background").read_bytes())
    changed = image_bytes(size, seed=seed)
    http_origin.add("background", changed, sidecars=("sha256",))
    hooks.release.set()
    await user
    await client.app[WORKER].join()
    return changed


async def assert_serves(client: TestClient[Any, Any], data: bytes) -> None:
    """What is served (cached by a later fill, or filled now) is ``data`` whole."""
    served = await get(client, "background")
    assert hashlib.sha256(served).digest() == hashlib.sha256(data).digest()


async def test_a_paused_background_fill_closes_its_connection_and_resumes_byte_exact(
    make_client: MakeClient, http_origin: Origin
) -> None:
    paused = await pause_mid_body(make_client, http_origin)
    client = paused.client
    flight = client.app[STATE].fills.current("background")
    assert flight is not None
    held_at = flight.available
    # Nothing more of it is sent while the client waits.
    throttled = "imagecache_background_throttled_seconds_total"
    waited = sample(client, throttled)
    await poll(lambda: _true(sample(client, throttled) >= waited + 0.5), "the fill waits")
    assert http_origin.bytes_sent("background") == paused.cut_at
    assert flight.available == held_at
    assert http_origin.body_reads("background") == 1

    paused.hooks.release.set()
    assert await paused.user == USER
    await client.app[WORKER].join()
    # Resumed once, from the first byte not written, and verified whole.
    gets = http_origin.requests_for("background")
    assert len(gets) == 2, gets
    assert "Range" not in gets[0]
    assert gets[1]["Range"] == f"bytes={held_at}-{len(BACKGROUND) - 1}"
    cached = await get(client, "background")
    assert hashlib.sha256(cached).digest() == hashlib.sha256(BACKGROUND).digest()
    assert sample(client, "imagecache_background_bytes_total") == len(BACKGROUND)
    assert sample(client, RELEASED) == 1
    assert sample(client, "imagecache_verification_failures_total") == 0


async def test_an_image_changed_during_the_pause_fails_the_fill_rather_than_splice(
    make_client: MakeClient, http_origin: Origin
) -> None:
    paused = await pause_mid_body(make_client, http_origin)
    client = paused.client
    changed = await change_and_resume(http_origin, client, paused.hooks, paused.user, seed=43)
    assert paused.user.result() == USER
    # The resume asked for the rest and was refused: the fill failed.
    registry = client.app[STATE].metrics.registry
    outcome = {"outcome": "refused"}
    assert registry.get_sample_value("imagecache_upstream_resumes_total", outcome) == 1
    assert "Range" in http_origin.requests_for("background")[1]
    await assert_serves(client, changed)
