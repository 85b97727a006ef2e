"""Cluster mode in the service: sibling fills turned on, heartbeats, and who is a sibling.

The central driver (``drivers/central.py``) is the cluster's memory: which
nodes are alive, which hold which image, which image was deleted, who is
reading which image from the origin. This module is what a service process
does with it:

- ``enable`` puts the sibling origin (``upstreams/sibling.py``: live siblings
  first, then the origin under a per-image claim) under the app's fills.
- ``ClusterTasks`` beats the node's heartbeat and applies deletions made
  through other nodes, every ``node_heartbeat_interval`` seconds.
- ``peer_request`` tells the image route whether a request comes from a
  sibling; a sibling is served only from this node's cache or from a fill in
  progress here, never by a new fill (which could ask the sibling back).

What the library needs of cluster mode (is the driver central, delete on
every node, the token's header) is ``imagecache/cluster.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from imagecache.cache import ImageCache
from imagecache.cluster import CLUSTER_TOKEN_HEADER
from imagecache.errors import CacheStoreError
from imagecache.server import background
from imagecache.server.metrics import Metrics
from imagecache.settings import Settings, secret_matches
from imagecache.upstreams.base import Upstream
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.sibling import NO_SIBLING_EVENTS, FillSource, SiblingUpstream

if TYPE_CHECKING:
    # Only a type here: the central driver pulls in SQLAlchemy and alembic, which
    # a node of the sqlite or xattr driver never uses (upstreams/sibling.py).
    from imagecache.drivers.central import CentralDriver

log = logging.getLogger(__name__)


class PeerRequest(enum.Enum):
    """Who sent a request to the image route, as far as the cluster is concerned."""

    CLIENT = "client"  # no cluster token: an ordinary client
    SIBLING = "sibling"  # the right cluster token
    REFUSED = "refused"  # a cluster token, but the wrong one (or none is configured)


def peer_request(settings: Settings, headers: Mapping[str, str]) -> PeerRequest:
    """Classify a request by its cluster token (``secret_matches``: constant time).

    A header that is present but empty is refused like a wrong one: it never
    matches, even when no cluster token is configured.
    """
    given = headers.get(CLUSTER_TOKEN_HEADER)
    if given is None:
        return PeerRequest.CLIENT
    if not secret_matches(settings.cluster_token, given):
        return PeerRequest.REFUSED
    return PeerRequest.SIBLING


class ClusterTasks:
    """Heartbeats and cross-node deletions of one service process, on a schedule."""

    def __init__(
        self,
        cache: ImageCache,
        driver: CentralDriver,
        interval: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.cache = cache
        self.driver = driver
        self.interval = interval
        self.metrics = metrics
        self.beats = 0
        # More work of each beat, added by other parts of the service (server/preheat.py
        # runs this node's preheat items): after the beat itself, which must not wait.
        self.after_beat: list[Callable[[], Awaitable[object]]] = []
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> list[str]:
        """One beat: announce this node alive, write its queued changes, drop images deleted
        elsewhere (``CentralDriver.sync``; with the database away, nothing but a log line)."""
        dropped = await asyncio.to_thread(self.driver.sync)
        if self.metrics is not None:
            self.metrics.cluster_database_up.set(0 if self.driver.offline else 1)
            depth = await asyncio.to_thread(self.driver.mirror.depth)
            self.metrics.cluster_outbox_images.set(depth)
            if not self.driver.offline:
                live = await asyncio.to_thread(self.driver.count_live_nodes)
                self.metrics.cluster_nodes_live.set(live)
        for image_id in dropped:
            await asyncio.to_thread(self.cache.delete_queued_image, image_id)
        self.beats += 1
        for work in self.after_beat:
            await work()
        return dropped

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except CacheStoreError as exc:
                # The database went away part-way through the beat (after sync, in
                # the work that follows it): expected of a partition, not a bug, so
                # no traceback. The next beat tries again.
                log.warning("cluster heartbeat cut short: %s", exc)
            except Exception:
                log.exception("cluster heartbeat failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cluster heartbeat")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                # Siblings stop asking this node at once instead of after node_dead_after.
                await asyncio.to_thread(self.driver.leave)
            except Exception as exc:
                log.warning("could not tell the cluster this node is leaving: %s", exc)


CLUSTER_TASKS = web.AppKey("cluster_tasks", ClusterTasks)


def enable(
    app: web.Application,
    settings: Settings,
    cache: ImageCache,
    origin: Upstream,
    origin_config: UpstreamConfig,
    metrics: Metrics | None = None,
) -> Upstream:
    """Turn cluster mode on for a service app when the cache is central.

    Returns the upstream fills should read: ``origin`` itself outside cluster
    mode (nothing changes), else a ``SiblingUpstream`` over it. Only fills use
    it; the proxy and the access checks keep talking to the origin (the proxy
    needs the Glance upstream itself). In cluster mode the app also beats and
    applies deletions while it runs.
    """
    driver = cache.central
    if driver is None:
        return origin
    tasks = ClusterTasks(cache, driver, settings.node_heartbeat_interval, metrics)
    app[CLUSTER_TASKS] = tasks

    async def start() -> None:
        tasks.start()

    if metrics is not None:
        for source in FillSource:
            metrics.cluster_fills.labels(source.value)  # shown at 0 from the start
    siblings = SiblingUpstream(
        origin, driver, origin_config, NO_SIBLING_EVENTS if metrics is None else metrics
    )

    async def on_cleanup(_app: web.Application) -> None:
        await tasks.stop()
        await siblings.close()

    background.add(app, start)  # the heartbeat starts once the socket accepts
    app.on_cleanup.append(on_cleanup)
    if settings.cluster_token is None:
        log.warning(
            "cluster_token is not set: this node will neither fetch images from its "
            "siblings nor serve them; every miss reads the origin"
        )
    return siblings


__all__ = [
    "CLUSTER_TASKS",
    "ClusterTasks",
    "PeerRequest",
    "enable",
    "peer_request",
]
