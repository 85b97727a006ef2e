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
from typing import Any

from aiohttp.test_utils import TestClient

from imagecache.fill.bandwidth import RELEASE_AFTER
from imagecache.server.cache_api import WORKER
from imagecache.server.state import STATE
from peers.origin import Origin
from server_helpers import image_bytes, poll
from test_background_bandwidth import ADMIN, TOKEN, HoldDecision, get, sample

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MiB = 1024 * 1024
BACKGROUND = image_bytes(8 * MiB, seed=41)
USER = image_bytes(256 * 1024, seed=42)
RELEASED = "imagecache_background_connections_released_total"


async def _true(value: bool) -> bool:
    return value


async def test_a_paused_background_fill_closes_its_connection_and_resumes_byte_exact(
    make_client: MakeClient, http_origin: Origin
) -> None:
    state = http_origin.add("background", BACKGROUND, sidecars=("sha256",))
    # 8 MiB at 4 MiB/s: about 2 s whole, so the pause below comes mid-body.
    state.rate = 4 * MiB
    http_origin.add("user", USER, sidecars=("sha256",))
    hooks = HoldDecision("user")
    client = await make_client(
        fill_hooks=hooks, admin_token=TOKEN, background_bandwidth_while_busy=0
    )
    fills = client.app[STATE].fills
    async with client.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await poll(
        lambda: _true(sample(client, "imagecache_background_bytes_total") >= MiB),
        "the background fill is 1 MiB in",
    )

    user = asyncio.create_task(get(client, "user"))
    await poll(lambda: _true(hooks.entered.is_set()), "the client's fill is being decided")
    assert fills.bandwidth.rate == 0

    # The origin sees the paused fill's connection end before the body is out,
    # and sends nothing more of it while the client waits.
    await poll(lambda: _true(state.bodies_ended >= 1), "the origin sees the connection end")
    cut_at = http_origin.bytes_sent("background")
    assert cut_at < len(BACKGROUND), "the whole body was sent: the connection stayed open"
    assert sample(client, RELEASED) == 1
    flight = fills.current("background")
    assert flight is not None
    held_at = flight.available
    throttled = "imagecache_background_throttled_seconds_total"
    waited = sample(client, throttled)
    await poll(
        lambda: _true(sample(client, throttled) >= waited + 2 * RELEASE_AFTER), "the fill waits"
    )
    assert http_origin.bytes_sent("background") == cut_at
    assert flight.available == held_at
    assert http_origin.body_reads("background") == 1

    hooks.release.set()
    assert await user == USER
    await client.app[WORKER].join()
    # Resumed once, from the first byte not written, and verified whole.
    gets = [h for m, p, h in http_origin.requests if m == "GET" and p.endswith("/background")]
    assert len(gets) == 2, gets
    assert "Range" not in gets[0]
    assert gets[1]["Range"] == f"bytes={held_at}-{len(BACKGROUND) - 1}"
    cached = await get(client, "background")
    assert hashlib.sha256(cached).digest() == hashlib.sha256(BACKGROUND).digest()
    assert sample(client, "imagecache_background_bytes_total") == len(BACKGROUND)
    assert sample(client, RELEASED) == 1
    assert sample(client, "imagecache_verification_failures_total") == 0
