"""Background fills within their bandwidth, and out of the way of clients (fill/bandwidth.py).

Real parts: the service's app (aiohttp test server), the queue worker fed by
``PUT /v2/cache/{id}``, a directory upstream read by the pump's thread, or
the same files offered as an async stream only (the other pump path). The
lower bound on a capped fill's time is the cap's correctness, not a speed
measurement. The one held point is the decision of the client's fill (a
fill hook), which keeps a client waiting on a flight for as long as the
test needs; everything else is observed by polling with deadlines.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from imagecache.fill.hooks import NO_HOOKS, FillHooks
from imagecache.server.app import create_app
from imagecache.server.cache_api import WORKER
from imagecache.server.state import STATE
from imagecache.settings import Settings
from imagecache.upstreams.base import ANONYMOUS, BlockingSource, Caller
from imagecache.upstreams.directory import DirectoryUpstream
from server_helpers import image_bytes, poll, put_image

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
TOKEN = "s3cret-admin-token"
ADMIN = {"X-Auth-Token": TOKEN}
MiB = 1024 * 1024
BACKGROUND = image_bytes(8 * MiB, seed=21)
USER = image_bytes(8 * MiB, seed=22)


class StreamOnly(DirectoryUpstream):
    """The same files, offered only as an async stream: the pump's other path."""

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource | None:
        return None


class HoldDecision(FillHooks):
    """Holds the decision of one image's fill until released: a client waits on it meanwhile."""

    def __init__(self, image_id: str) -> None:
        self.image_id = image_id
        self.entered = threading.Event()
        self.release = threading.Event()

    def deciding(self, image_id: str) -> None:
        if image_id == self.image_id:
            self.entered.set()
            assert self.release.wait(30), "the test never released the decision"


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    put_image(root, "background", BACKGROUND)
    put_image(root, "user", USER)
    return root


def sample(client: TestClient[Any, Any], name: str) -> float:
    value = client.app[STATE].metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


async def get(client: TestClient[Any, Any], image_id: str) -> bytes:
    async with client.get(f"/v2/images/{image_id}/file") as response:
        assert response.status == 200
        return await response.read()


@pytest.mark.parametrize("upstream_kind", [DirectoryUpstream, StreamOnly])
async def test_a_background_fill_keeps_to_its_cap_and_a_client_fill_does_not(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    origin: Path,
    upstream_kind: type[DirectoryUpstream],
) -> None:
    # The same rate while busy: this test is about the cap alone.
    settings = make_settings(
        admin_token=TOKEN,
        background_bandwidth="2MiB/s",
        background_bandwidth_while_busy="2MiB/s",
    )
    client = await aiohttp_client(create_app(settings, upstream=upstream_kind(origin)))
    fills = client.app[STATE].fills
    started = time.monotonic()
    async with client.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await poll(lambda: _true(fills.current("background") is not None), "the queued fill starts")

    # A client's fill meanwhile is not held to the background's cap ...
    assert await get(client, "user") == USER
    assert fills.current("background") is not None, "the background fill ran ahead of its cap"

    await client.app[WORKER].join()
    elapsed = time.monotonic() - started
    # ... while the background one is: its last 1 MiB chunk may start only once
    # 8 MiB - 1 MiB (that chunk) - 1 MiB (the burst) have been paid for at 2 MiB/s.
    assert elapsed >= 3.0, elapsed
    assert await get(client, "background") == BACKGROUND
    assert sample(client, "imagecache_background_bytes_total") == len(BACKGROUND)
    assert sample(client, "imagecache_bytes_from_upstream_total") == len(BACKGROUND) + len(USER)
    assert sample(client, "imagecache_background_throttled_seconds_total") > 2.0
    assert sample(client, "imagecache_background_rate_limit_bytes_per_second") == 2 * MiB


async def test_a_background_fill_pauses_while_a_client_waits_on_a_fill(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin: Path
) -> None:
    settings = make_settings(
        admin_token=TOKEN,
        background_bandwidth="2MiB/s",
        background_bandwidth_while_busy=0,  # pause
    )
    hooks = HoldDecision("user")
    client = await aiohttp_client(
        create_app(settings, upstream=DirectoryUpstream(origin), fill_hooks=hooks)
    )
    fills = client.app[STATE].fills
    throttled = "imagecache_background_throttled_seconds_total"
    async with client.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await poll(
        lambda: _true(sample(client, "imagecache_background_bytes_total") > 0),
        "the background fill reads",
    )
    assert sample(client, "imagecache_background_rate_limit_bytes_per_second") == 2 * MiB

    user = asyncio.create_task(get(client, "user"))
    await poll(lambda: _true(hooks.entered.is_set()), "the client's fill is being decided")
    assert fills.bandwidth.busy
    assert fills.bandwidth.rate == 0
    assert sample(client, "imagecache_background_rate_limit_bytes_per_second") == 0

    # Once the chunk it may have been reading is in, the background fill stands
    # still for as long as the client waits: 1 s of being held, in which 2 MiB/s
    # would have read two more chunks.
    paused_at = sample(client, throttled)
    await poll(lambda: _true(sample(client, throttled) >= paused_at + 0.3), "the fill waits")
    flight = fills.current("background")
    assert flight is not None
    held_at = flight.available
    waited = sample(client, throttled)
    await poll(lambda: _true(sample(client, throttled) >= waited + 1.0), "the fill waits on")
    assert flight.available == held_at < len(BACKGROUND)

    hooks.release.set()
    assert await user == USER
    # The client is served: the background fill goes on at its own rate and completes.
    await poll(lambda: _true(not fills.bandwidth.busy), "the busy state ends")
    await client.app[WORKER].join()
    assert await get(client, "background") == BACKGROUND
    assert sample(client, "imagecache_background_rate_limit_bytes_per_second") == 2 * MiB
    assert sample(client, "imagecache_background_bytes_total") == len(BACKGROUND)


async def test_a_client_joining_a_background_fill_lifts_its_cap(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin: Path
) -> None:
    # 1 MiB/s would take 7 s or more for the 8 MiB; the client's download ends
    # long before because the fill it joined is on demand from then on.
    settings = make_settings(
        admin_token=TOKEN, background_bandwidth="1MiB/s", background_bandwidth_while_busy=0
    )
    client = await aiohttp_client(create_app(settings, upstream=DirectoryUpstream(origin)))
    fills = client.app[STATE].fills
    async with client.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await poll(
        lambda: _true(sample(client, "imagecache_background_bytes_total") > 0),
        "the background fill reads",
    )
    assert await get(client, "background") == BACKGROUND
    await client.app[WORKER].join()
    # What it read as a background fill was within its cap; the rest, for the client, was not.
    assert sample(client, "imagecache_background_bytes_total") < len(BACKGROUND)
    assert sample(client, "imagecache_bytes_from_upstream_total") == len(BACKGROUND)
    assert not fills.bandwidth.busy


async def test_the_new_metrics_pass_promtool(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("SKIPPED LOUDLY: promtool is not installed (Debian package prometheus)")
    client = await aiohttp_client(
        create_app(make_settings(), upstream=DirectoryUpstream(origin), fill_hooks=NO_HOOKS)
    )
    async with client.get("/metrics") as response:
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["imagecache_background_bytes"].type == "counter"
    assert families["imagecache_background_throttled_seconds"].type == "counter"
    gauge = families["imagecache_background_rate_limit_bytes_per_second"]
    assert [s.value for s in gauge.samples] == [float("inf")]  # the default: no cap
    lint = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


async def _true(value: bool) -> bool:
    return value


async def test_a_client_waiting_in_another_worker_pauses_this_ones_background_fill(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin: Path
) -> None:
    # Two services over one cache directory stand for two worker processes: the
    # mark is a file locked through its own open file description, as between
    # processes (flock locks belong to the description, not the process).
    settings = make_settings(
        admin_token=TOKEN, background_bandwidth="2MiB/s", background_bandwidth_while_busy=0
    )
    hooks = HoldDecision("user")
    busy_one = await aiohttp_client(
        create_app(settings, upstream=DirectoryUpstream(origin), fill_hooks=hooks)
    )
    other = await aiohttp_client(create_app(settings, upstream=DirectoryUpstream(origin)))
    async with other.put("/v2/cache/background", headers=ADMIN) as response:
        assert response.status == 202
    await poll(
        lambda: _true(sample(other, "imagecache_background_bytes_total") > 0),
        "the background fill reads",
    )
    user = asyncio.create_task(get(busy_one, "user"))
    await poll(lambda: _true(hooks.entered.is_set()), "the client's fill is being decided")
    bandwidth = other.app[STATE].fills.bandwidth
    await poll(lambda: _true(bandwidth.others_busy), "the other worker sees the waiting client")
    assert not bandwidth.busy
    assert bandwidth.rate == 0
    await poll(
        lambda: _true(sample(other, "imagecache_background_rate_limit_bytes_per_second") == 0),
        "the gauge shows the pause",
    )
    flight = other.app[STATE].fills.current("background")
    assert flight is not None
    throttled = "imagecache_background_throttled_seconds_total"
    paused_at = sample(other, throttled)
    await poll(lambda: _true(sample(other, throttled) >= paused_at + 0.3), "the fill waits")
    held_at = flight.available
    waited = sample(other, throttled)
    await poll(lambda: _true(sample(other, throttled) >= waited + 1.0), "the fill waits on")
    assert flight.available == held_at < len(BACKGROUND)

    hooks.release.set()
    assert await user == USER
    await poll(lambda: _true(not bandwidth.others_busy), "the client's worker is idle again")
    await other.app[WORKER].join()
    assert await get(other, "background") == BACKGROUND
