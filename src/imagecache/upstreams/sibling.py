"""The sibling origin of cluster mode: live siblings first, then the origin, under a claim.

``SiblingUpstream`` wraps the origin. A whole-image read first tries a live
sibling that holds the image (``GET {sibling}/v2/images/{id}/file`` with the
cluster token), then a sibling that is reading it from the origin right now
(it serves its growing fill), and only then the origin, under a per-image
claim (a PostgreSQL advisory lock) so one node in the cluster reads a given
image from the origin at a time. A sibling that fails mid-stream is left for
the next source, which continues at the byte where it stopped (a Range read),
so the fill's one running hash still covers the whole image and the
``FillWriter`` verifies it like any fill.

Siblings never see the caller's identity: the node that took the request has
already checked it against the origin, and the cluster token is what lets
that node's request in. Where each fill's bytes came from goes to a
``SiblingEvents`` sink (the service's metrics). The service turns it on in
``server/cluster.py``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

import aiohttp

from imagecache.cluster import CLUSTER_TOKEN_HEADER
from imagecache.errors import CacheStoreError, SiblingFailed
from imagecache.records import ImageInfo
from imagecache.sites import choose_sibling
from imagecache.upstreams.base import ANONYMOUS, Caller, Upstream
from imagecache.upstreams.config import UpstreamConfig

if TYPE_CHECKING:
    # Only a type here: the central driver pulls in SQLAlchemy and alembic, about
    # 0.4 s of the 1.2 s a service spent importing before it served (min of 5
    # runs, python -X importtime; docs/benchmarks-log.md), which a node of the
    # sqlite or xattr driver never uses.
    from imagecache.drivers.central import CentralDriver

log = logging.getLogger(__name__)

# How often a node waiting for another node's origin claim looks again.
CLAIM_POLL_INTERVAL = 0.1
# How long it waits for a claim whose holder it cannot fetch from, before
# reading the origin itself: a stuck holder must not stall the cluster.
CLAIM_WAIT_LIMIT = 15.0
SIBLING_CHUNK = 1024 * 1024


class FillSource(enum.Enum):
    """Where a whole-image read's bytes came from (the ``source`` label of the metric)."""

    SIBLING = "sibling"
    ORIGIN = "origin"
    SIBLING_THEN_ORIGIN = "sibling_then_origin"  # a sibling failed part-way; the origin went on


class SiblingEvents(Protocol):
    """The sink a ``SiblingUpstream`` reports to; called on the event loop, returns at once."""

    def filled_from(self, source: FillSource) -> None:
        """A whole-image read ended, its bytes from ``source``."""


class _NoSiblingEvents:
    def filled_from(self, source: FillSource) -> None:
        pass


NO_SIBLING_EVENTS: SiblingEvents = _NoSiblingEvents()


class SiblingUpstream(Upstream):
    """The origin, with live siblings tried first for whole-image reads."""

    kind = "cluster"

    def __init__(
        self,
        origin: Upstream,
        driver: CentralDriver,
        config: UpstreamConfig,
        events: SiblingEvents = NO_SIBLING_EVENTS,
    ) -> None:
        self.origin = origin
        self.caller_dependent = origin.caller_dependent
        self.driver = driver
        self.config = config
        self.events = events
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
                total=None, sock_connect=5.0, sock_read=self.config.upstream_timeout
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
        if start != 0 or end is not None or self.config.cluster_token is None:
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
                    log.warning("sibling %s failed to serve %s: %s", source, image_id, exc.why)
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
        self.events.filled_from(source)

    async def _pick_sibling(self, image_id: str, received: int, failed: set[str]) -> str | None:
        """A live sibling holding the image, by site; else (from byte 0) one filling it now."""

        def look() -> str | None:
            holder = choose_sibling(
                self.driver.get_cached_siblings(image_id),
                self.config.site,
                self.config.sibling_cross_site,
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

        try:
            return await asyncio.to_thread(look)
        except CacheStoreError as exc:
            # The cluster database is away: no sibling can be found, the origin serves.
            log.warning("no sibling lookup for %s: %s", image_id, exc)
            return None

    async def _from_sibling(
        self, base: str, image_id: str, start: int
    ) -> AsyncGenerator[bytes, None]:
        token = self.config.cluster_token
        assert token is not None
        headers = {CLUSTER_TOKEN_HEADER: token.get_secret_value()}
        if start:
            headers["Range"] = f"bytes={start}-"
        url = f"{base}/v2/images/{image_id}/file"
        try:
            async with self._client().get(url, headers=headers) as response:
                expected = 206 if start else 200
                if response.status != expected:
                    raise SiblingFailed(base, f"HTTP {response.status}")
                if start and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {start}-"
                ):
                    raise SiblingFailed(base, "answered another range than asked")
                async for chunk in response.content.iter_chunked(SIBLING_CHUNK):
                    yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Includes a body cut short (ClientPayloadError): the sibling died or
            # aborted a fill that failed verification.
            raise SiblingFailed(base, f"{type(exc).__name__}: {exc}") from exc


__all__ = [
    "NO_SIBLING_EVENTS",
    "FillSource",
    "SiblingEvents",
    "SiblingUpstream",
]
