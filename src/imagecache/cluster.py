"""Cluster mode in the service: sibling fills, heartbeats and cluster-wide deletion.

The central driver (``drivers/central.py``) is the cluster's memory: which
nodes are alive, which hold which image, which image was deleted, who is
reading which image from the origin. This module is what a service process
does with it:

- ``SiblingUpstream`` wraps the origin. A whole-image read first tries a live
  sibling that holds the image (``GET {sibling}/v2/images/{id}/file`` with the
  cluster token), then a sibling that is reading it from the origin right now
  (it serves its growing fill), and only then the origin, under a per-image
  claim (a PostgreSQL advisory lock) so one node in the cluster reads a given
  image from the origin at a time. A sibling that fails mid-stream is left
  for the next source, which continues at the byte where it stopped (a Range
  read), so the fill's one running hash still covers the whole image and the
  ``FillWriter`` verifies it like any fill.
- ``ClusterTasks`` beats the node's heartbeat and applies deletions made
  through other nodes, every ``node_heartbeat_interval`` seconds.
- ``peer_request`` tells the image route whether a request comes from a
  sibling; a sibling is served only from this node's cache or from a fill in
  progress here, never by a new fill (which could ask the sibling back).

Siblings never see the caller's identity: the node that took the request has
already checked it against the origin, and the cluster token is what lets
that node's request in.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sys
import time
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, cast

import aiohttp
from aiohttp import web

from imagecache.cache import ImageCache
from imagecache.records import ImageInfo
from imagecache.server import background
from imagecache.server.metrics import Metrics
from imagecache.settings import Settings, secret_matches
from imagecache.sites import choose_sibling
from imagecache.upstreams.base import ANONYMOUS, Caller, Upstream

if TYPE_CHECKING:
    # Only a type here: the central driver pulls in SQLAlchemy and alembic, about
    # 0.4 s of the 1.2 s a service spent importing before it served (min of 5
    # runs, python -X importtime; docs/benchmarks-log.md), which a node of the
    # sqlite or xattr driver never uses.
    from imagecache.drivers.central import CentralDriver

log = logging.getLogger(__name__)

# The node-to-node credential travels in this header (never logged).
CLUSTER_TOKEN_HEADER = "X-Imagecache-Cluster-Token"  # noqa: S105 - a header name
# How often a node waiting for another node's origin claim looks again.
CLAIM_POLL_INTERVAL = 0.1
# How long it waits for a claim whose holder it cannot fetch from, before
# reading the origin itself: a stuck holder must not stall the cluster.
CLAIM_WAIT_LIMIT = 15.0
SIBLING_CHUNK = 1024 * 1024


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


class FillSource(enum.Enum):
    """Where a whole-image read's bytes came from (the ``source`` label of the metric)."""

    SIBLING = "sibling"
    ORIGIN = "origin"
    SIBLING_THEN_ORIGIN = "sibling_then_origin"  # a sibling failed part-way; the origin went on


class SiblingFailed(Exception):
    """A sibling could not serve the image (absent, refused, or cut off mid-stream)."""


def central_driver(cache: ImageCache) -> CentralDriver | None:
    """The cache's driver if it is the cluster one."""
    # A central driver can exist only once create_driver has imported its module:
    # looked up there, so that asking never imports it.
    central = sys.modules.get("imagecache.drivers.central")
    if central is None or not isinstance(cache.driver, central.CentralDriver):
        return None
    return cast("CentralDriver", cache.driver)


def delete_everywhere(cache: ImageCache, image_id: str) -> bool:
    """Delete the cached copy here and, in cluster mode, on every node (see ``ClusterTasks``).

    A fill of the image in progress here is cancelled first: the deletion wins,
    its clients still get their bytes, the cache does not keep them.
    """
    cancelled = cache.cancel_fill(image_id)
    driver = central_driver(cache)
    if driver is None:
        return cache.delete_cached_image(image_id) or cancelled
    return driver.delete_everywhere(image_id) or cancelled


class SiblingUpstream(Upstream):
    """The origin, with live siblings tried first for whole-image reads."""

    kind = "cluster"

    def __init__(
        self,
        origin: Upstream,
        driver: CentralDriver,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.origin = origin
        self.caller_dependent = origin.caller_dependent
        self.driver = driver
        self.settings = settings
        self.metrics = metrics
        if metrics is not None:
            for source in FillSource:
                metrics.cluster_fills.labels(source.value)  # shown at 0 from the start
        self._session: aiohttp.ClientSession | None = None
        # Counted for the metrics and the tests: where whole-image fills came from.
        self.reads_from_siblings = 0
        self.reads_from_origin = 0

    async def check_reachable(self) -> str:
        return await self.origin.check_reachable()

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        return await self.origin.info(image_id, caller)

    async def check_access(self, image_id: str, caller: Caller) -> None:
        await self.origin.check_access(image_id, caller)

    async def close(self) -> None:
        """Close the sibling connections; the origin belongs to the app, which closes it."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=5.0, sock_read=self.settings.upstream_timeout
            )
            self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        return self._session

    async def stream(
        self,
        image_id: str,
        caller: Caller = ANONYMOUS,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        if start != 0 or end is not None or self.settings.cluster_token is None:
            # Parts of images are streamed through, not filled: the origin serves them.
            async for chunk in self.origin.stream(image_id, caller, start, end):
                yield chunk
            return
        received = 0
        failed: set[str] = set()
        waiting_since: float | None = None
        while True:
            source = await self._pick_sibling(image_id, received, failed)
            if source is not None:
                try:
                    async for chunk in self._from_sibling(source, image_id, received):
                        received += len(chunk)
                        yield chunk
                except SiblingFailed as exc:
                    log.warning("sibling %s failed to serve %s: %s", source, image_id, exc)
                    failed.add(source)
                    continue
                self.reads_from_siblings += 1
                self._count(FillSource.SIBLING)
                log.info("filled %s from sibling %s", image_id, source)
                return
            claim = await asyncio.to_thread(self.driver.claim_origin_fill, image_id, failed)
            holder = None
            if claim is None:
                holder = await asyncio.to_thread(self.driver.origin_filler, image_id)
                now = time.monotonic()
                waiting_since = now if waiting_since is None else waiting_since
                # Wait while the holder is one we could still fetch from, within a limit.
                if (holder is None or holder not in failed) and (
                    now - waiting_since < CLAIM_WAIT_LIMIT
                ):
                    await asyncio.sleep(CLAIM_POLL_INTERVAL)
                    continue
                log.warning(
                    "reading %s from the origin although %s holds its claim: it could not "
                    "serve this node",
                    image_id,
                    holder or "another node",
                )
            try:
                self.reads_from_origin += 1
                continued = received > 0
                async for chunk in self.origin.stream(image_id, caller, received):
                    yield chunk
                self._count(FillSource.SIBLING_THEN_ORIGIN if continued else FillSource.ORIGIN)
            finally:
                if claim is not None:
                    await asyncio.shield(asyncio.to_thread(claim.release))
            return

    def _count(self, source: FillSource) -> None:
        if self.metrics is not None:
            self.metrics.cluster_fills.labels(source.value).inc()

    async def _pick_sibling(self, image_id: str, received: int, failed: set[str]) -> str | None:
        """A live sibling holding the image, by site; else (from byte 0) one filling it now."""

        def look() -> str | None:
            holder = choose_sibling(
                self.driver.get_cached_siblings(image_id),
                self.settings.site,
                self.settings.sibling_cross_site,
                skip={*failed, self.driver.self_url},
            )
            if holder is not None:
                return holder
            if received:
                # A fill in progress serves only from byte 0 (a ranged miss would
                # make the sibling read the origin): continue from the origin.
                return None
            filler = self.driver.origin_filler(image_id)
            return filler if filler is not None and filler not in failed else None

        return await asyncio.to_thread(look)

    async def _from_sibling(
        self, base: str, image_id: str, start: int
    ) -> AsyncGenerator[bytes, None]:
        token = self.settings.cluster_token
        assert token is not None
        headers = {CLUSTER_TOKEN_HEADER: token.get_secret_value()}
        if start:
            headers["Range"] = f"bytes={start}-"
        url = f"{base}/v2/images/{image_id}/file"
        try:
            async with self._client().get(url, headers=headers) as response:
                expected = 206 if start else 200
                if response.status != expected:
                    raise SiblingFailed(f"HTTP {response.status}")
                if start and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {start}-"
                ):
                    raise SiblingFailed("answered another range than asked")
                async for chunk in response.content.iter_chunked(SIBLING_CHUNK):
                    yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Includes a body cut short (ClientPayloadError): the sibling died or
            # aborted a fill that failed verification.
            raise SiblingFailed(f"{type(exc).__name__}: {exc}") from exc


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
        self._task: asyncio.Task[None] | None = None

    async def tick(self) -> list[str]:
        """One beat: announce this node alive and drop images deleted elsewhere."""
        await asyncio.to_thread(self.driver.heartbeat)
        if self.metrics is not None:
            live = await asyncio.to_thread(self.driver.list_nodes)
            self.metrics.cluster_nodes_live.set(sum(1 for node in live if node.alive))
        dropped = await asyncio.to_thread(self.driver.apply_deletions)
        for image_id in dropped:
            await asyncio.to_thread(self.cache.delete_queued_image, image_id)
        self.beats += 1
        return dropped

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database may be briefly away; the next beat tries again.
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
    metrics: Metrics | None = None,
) -> Upstream:
    """Turn cluster mode on for a service app when the cache is central.

    Returns the upstream fills should read: ``origin`` itself outside cluster
    mode (nothing changes), else a ``SiblingUpstream`` over it. Only fills use
    it; the proxy and the access checks keep talking to the origin (the proxy
    needs the Glance upstream itself). In cluster mode the app also beats and
    applies deletions while it runs.
    """
    driver = central_driver(cache)
    if driver is None:
        return origin
    tasks = ClusterTasks(cache, driver, settings.node_heartbeat_interval, metrics)
    app[CLUSTER_TASKS] = tasks

    async def start() -> None:
        tasks.start()

    siblings = SiblingUpstream(origin, driver, settings, metrics)

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
    "CLUSTER_TOKEN_HEADER",
    "ClusterTasks",
    "FillSource",
    "PeerRequest",
    "SiblingFailed",
    "SiblingUpstream",
    "central_driver",
    "delete_everywhere",
    "enable",
    "peer_request",
]
