"""A paused background segmented fill closes its connections and reopens each segment with Range.

The twin of test_background_release.py for the async path with N connections
(fill/segments.py): the same real app, queue worker and ``http_origin`` peer,
paced per connection so that four segments are mid-body when a client comes,
and the same held decision of the client's fill keeping the background one
paused. Without the release, the paused segments' connections stay open and
the origin sends each of them whole into the socket buffers.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient

from imagecache.server.cache_api import WORKER
from imagecache.server.state import STATE
from peers.origin import Origin
from server_helpers import image_bytes, poll
from test_background_bandwidth import ADMIN, TOKEN, HoldDecision, get, sample
from test_background_release import Paused, _true, assert_serves, change_and_resume

MakeClient = Callable[..., Awaitable[TestClient[Any, Any]]]
MiB = 1024 * 1024
BACKGROUND = image_bytes(8 * MiB, seed=51)
USER = image_bytes(256 * 1024, seed=52)
RELEASED = "imagecache_background_connections_released_total"
SEGMENTED = {"fill_segments": 4, "fill_segment_size": MiB}
CONNECTIONS = 4


async def pause_mid_segments(make_client: MakeClient, http_origin: Origin) -> Paused:
    state = http_origin.add("background", BACKGROUND, sidecars=("sha256",))
    # 1 MiB/s per connection: each 1 MiB segment takes about a second.
    state.rate = MiB
    http_origin.add("user", USER, sidecars=("sha256",))
    hooks = HoldDecision("user")
    client = await make_client(
        fill_hooks=hooks, admin_token=TOKEN, background_bandwidth_while_busy=0, **SEGMENTED
    )
    async with client.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await http_origin.wait_for_reads("background", CONNECTIONS)
    await poll(
        lambda: _true(sample(client, "imagecache_background_bytes_total") >= MiB // 2),
        "the background fill is half a MiB in",
    )
    user = asyncio.create_task(get(client, "user"))
    await poll(lambda: _true(hooks.entered.is_set()), "the client's fill is being decided")
    assert client.app[STATE].fills.bandwidth.rate == 0
    # Every open segment's connection ends before its segment is out.
    await poll(
        lambda: _true(state.bodies_ended == state.body_reads == CONNECTIONS),
        "the origin sees the four connections end",
    )
    assert http_origin.bytes_sent("background") < CONNECTIONS * MiB, "the segments were sent whole"
    assert sample(client, RELEASED) == CONNECTIONS
    return Paused(client, state, hooks, user, http_origin.bytes_sent("background"))


async def test_a_paused_segmented_fill_closes_its_connections_and_resumes_byte_exact(
    make_client: MakeClient, http_origin: Origin
) -> None:
    paused = await pause_mid_segments(make_client, http_origin)
    client = paused.client
    # Nothing more is sent, and no segment is asked for, while the client waits.
    sent = http_origin.bytes_sent("background")
    throttled = "imagecache_background_throttled_seconds_total"
    waited = sample(client, throttled)
    await poll(lambda: _true(sample(client, throttled) >= waited + 1.0), "the fill waits")
    assert http_origin.bytes_sent("background") == sent
    assert http_origin.body_reads("background") == CONNECTIONS

    paused.hooks.release.set()
    assert await paused.user == USER
    await client.app[WORKER].join()
    ranges = [headers["Range"] for headers in http_origin.requests_for("background")]
    spans = [tuple(map(int, re.findall(r"\d+", value))) for value in ranges]
    # Eight segments asked for once each, and the four paused ones again from
    # where each had got to, up to its own end (not the image's).
    fresh = [(start, end) for start, end in spans if start % MiB == 0]
    reopened = [(start, end) for start, end in spans if start % MiB != 0]
    assert sorted(fresh) == [(i * MiB, (i + 1) * MiB - 1) for i in range(8)], ranges
    assert len(reopened) == CONNECTIONS, ranges
    assert all(start // MiB == end // MiB for start, end in reopened), ranges
    cached = await get(client, "background")
    assert hashlib.sha256(cached).digest() == hashlib.sha256(BACKGROUND).digest()
    assert sample(client, "imagecache_background_bytes_total") == len(BACKGROUND)
    # What the released connections' buffers held was sent twice: a little.
    assert http_origin.bytes_sent("background") < 1.25 * len(BACKGROUND)
    assert sample(client, RELEASED) == CONNECTIONS
    assert sample(client, "imagecache_verification_failures_total") == 0
    registry = client.app[STATE].metrics.registry
    # A release's reopen is not a resume after a failure.
    resumed = registry.get_sample_value("imagecache_upstream_resumes_total", {"outcome": "resumed"})
    assert not resumed


async def test_an_image_changed_during_the_pause_fails_the_segmented_fill_rather_than_splice(
    make_client: MakeClient, http_origin: Origin
) -> None:
    paused = await pause_mid_segments(make_client, http_origin)
    client = paused.client
    changed = await change_and_resume(http_origin, client, paused.hooks, paused.user, seed=53)
    assert paused.user.result() == USER
    registry = client.app[STATE].metrics.registry
    refused = registry.get_sample_value("imagecache_upstream_resumes_total", {"outcome": "refused"})
    assert refused is not None
    assert refused >= 1
    assert sample(client, "imagecache_verification_failures_total") == 0, "refused, not spliced"
    await assert_serves(client, changed)
