"""Fetch queued images into the cache now, a few at a time, surviving every failure.

``PUT /v2/cache/{id}`` writes the queue marker and calls ``submit``. Glance's
worker is one thread that dies on the first exception; this one is
``prefetch_concurrency`` tasks that log a failed fetch and take the next.
The fill goes through the same single-flight coordinator as downloads, so a
queued image that a client is downloading right now is not fetched twice.
"""

from __future__ import annotations

import asyncio
import logging

from imagecache.errors import ImageCacheError
from imagecache.fill.coordinator import FillCoordinator
from imagecache.fill.flight import FlightKind
from imagecache.metadata import MetadataCache
from imagecache.prefetch import Prefetcher
from imagecache.upstreams.base import SERVICE, Caller

log = logging.getLogger(__name__)


class QueueWorker:
    """A bounded pool of fetch tasks fed by ``submit``."""

    def __init__(
        self,
        fills: FillCoordinator,
        concurrency: int,
        metadata: MetadataCache | None = None,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self.fills = fills
        # Shared with the downloads: a queued image that clients are missing
        # right now costs the origin no second metadata read.
        self.metadata = metadata
        self.concurrency = concurrency
        self._queue: asyncio.Queue[tuple[str, Caller]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        # The service's (server/app.py): wraps ``fetch`` with retries and records
        # each image's last error beside its queue marker. None: plain ``fetch``.
        self.prefetcher = prefetcher

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._work(), name=f"queue worker {n}")
            for n in range(self.concurrency)
        ]

    def submit(self, image_id: str, caller: Caller = SERVICE) -> None:
        self._queue.put_nowait((image_id, caller))

    async def join(self) -> None:
        """Wait until every submitted image has been tried (for tests and shutdown)."""
        await self._queue.join()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            image_id, caller = await self._queue.get()
            try:
                if self.prefetcher is not None:
                    await self.prefetcher.fetch(image_id, caller)
                else:
                    await self.fetch(image_id, caller)
            except asyncio.CancelledError:
                raise
            except ImageCacheError as exc:
                log.warning("queued image %s not cached: %s", image_id, exc)
            except Exception:
                log.exception("queued image %s not cached", image_id)
            finally:
                self._queue.task_done()

    async def fetch(self, image_id: str, caller: Caller = SERVICE) -> None:
        cache = self.fills.cache
        image_id = cache.layout.accept(image_id)
        if await self.fills.run(cache.is_cached, image_id):
            await self.fills.run(cache.delete_queued_image, image_id)
            return
        if self.metadata is not None:
            info = await self.metadata.info(image_id, caller)
        else:
            info = await self.fills.upstream.info(image_id, caller)
        flight = await self.fills.fill_detached(image_id, info, caller)
        if flight.kind is FlightKind.NONE:
            log.info("queued image %s not fetched: %s", image_id, flight.reason or "not cacheable")
