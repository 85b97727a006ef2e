"""The prefetcher: drains the queue into the cache from the upstream.

Unlike Glance's prefetcher it never re-downloads an image that is already
cached, runs a bounded number of fills at once (``prefetch_concurrency``),
retries transient upstream failures with exponential backoff
(``prefetch_retries``), and survives any single failure: the image keeps its
queue marker and its last error is recorded beside it, in a hidden sidecar
``queue/.<id>.error`` (JSON). Hidden names are never image ids, so the driver's
queue listing never sees the sidecars; ``queued_details`` joins the two.

Every prefetch fills through a ``FillCoordinator`` (fill/coordinator.py) as a
detached flight, the one miss path of the cache: inside the service the
prefetcher is given the service's coordinator (server/operations.py), so a
queued image that clients are downloading right now is read from the origin
once; run standalone (the CLI's ``prefetch``, a program's own) it builds a
coordinator of its own over the same cache directory, which shares a fill of a
service on that directory through the fill lock instead of skipping the image.
Why not a plain ``FillWriter`` loop for the CLI: it was a second copy of the
decide, reserve, write, verify and commit steps, without the coordinator's
following of another process's fill, its bypass on a broken disk or its pump
thread, and the two had drifted apart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from imagecache.cache import ImageCache
from imagecache.capacity import Capacity
from imagecache.errors import (
    ImageCacheError,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotActive,
    UpstreamNotFound,
)
from imagecache.fill import fill_config
from imagecache.fill.config import FillConfig
from imagecache.fill.coordinator import FillCoordinator
from imagecache.fill.events import NO_EVENTS
from imagecache.fill.flight import CACHED, FlightKind
from imagecache.layout import CacheLayout, unlink_if_exists
from imagecache.metadata import MetadataCache, metadata_for
from imagecache.records import PrefetchOutcome, PrefetchReport, QueuedImage
from imagecache.upstreams.base import SERVICE, Caller, Upstream

if TYPE_CHECKING:
    from imagecache.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class PrefetchConfig:
    """What a standalone prefetcher reads (``Prefetcher.standalone``); settings' names."""

    fill: FillConfig  # for its own coordinator
    metadata_cache_ttl: float
    prefetch_concurrency: int
    prefetch_retries: int


def prefetch_config(settings: Settings) -> PrefetchConfig:
    """The values of ``settings`` a standalone prefetch reads (built by the CLI)."""
    return PrefetchConfig(
        fill=fill_config(settings),
        metadata_cache_ttl=settings.metadata_cache_ttl,
        prefetch_concurrency=settings.prefetch_concurrency,
        prefetch_retries=settings.prefetch_retries,
    )


# Refusals that another try will not change.
_PERMANENT = (UpstreamNotFound, UpstreamForbidden, UpstreamNotActive)


# --- the error sidecars -------------------------------------------------------------------


def _error_path(layout: CacheLayout, image_id: str) -> Path:
    return layout.queue_dir / f".{layout.accept(image_id)}.error"


def record_error(layout: CacheLayout, image_id: str, error: str, attempts: int) -> None:
    """Remember why the last prefetch of ``image_id`` failed (atomically replaced)."""
    path = _error_path(layout, image_id)
    # A name of this thread's own: two writers sharing one truncated each
    # other's file, and the second rename found nothing to rename.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    body = {"error": error[:2000], "attempts": attempts, "failed_at": time.time()}
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def clear_error(layout: CacheLayout, image_id: str) -> None:
    unlink_if_exists(_error_path(layout, image_id))


def read_error(layout: CacheLayout, image_id: str) -> dict[str, Any] | None:
    try:
        loaded = json.loads(_error_path(layout, image_id).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def queued_details(cache: ImageCache) -> list[QueuedImage]:
    """The queue in order, each entry with its last prefetch error (if any)."""
    layout = cache.layout
    found = []
    for image_id in cache.get_queued_images():
        try:
            queued_at = os.stat(layout.queue_path(layout.accept(image_id))).st_mtime
        except FileNotFoundError:
            continue  # prefetched while we looked
        error = read_error(layout, image_id) or {}
        found.append(
            QueuedImage(
                image_id=image_id,
                queued_at=queued_at,
                error=error.get("error"),
                attempts=int(error.get("attempts", 0)),
                failed_at=error.get("failed_at"),
            )
        )
    return found


def forget_stale_errors(cache: ImageCache) -> int:
    """Remove sidecars whose marker is gone (the queue entry was deleted or cached)."""
    layout = cache.layout
    removed = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(layout.queue_dir) as entries:
        for entry in list(entries):
            name = entry.name
            if not (name.startswith(".") and name.endswith(".error")):
                continue
            image_id = name[1 : -len(".error")]
            if not layout.is_valid(image_id) or not cache.is_queued(image_id):
                removed += unlink_if_exists(Path(entry.path))
    return removed


# --- the prefetcher -------------------------------------------------------------------------


class Prefetcher:
    """Fills queued images from ``upstream`` with bounded concurrency and retries."""

    def __init__(
        self,
        cache: ImageCache,
        upstream: Upstream,
        *,
        fills: FillCoordinator,
        metadata: MetadataCache,
        concurrency: int,
        retries: int,
        backoff: float = 0.5,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.cache = cache
        self.upstream = upstream
        # The origin's answers about images, shared with a service on the same
        # cache directory (the CLI's prefetch builds its own over the same files).
        self.metadata = metadata
        self.backoff = backoff
        # Where blocking calls run (None: asyncio's default). The service passes
        # its disk executor, which it drains before closing the cache, so no
        # thread of ours is left using a closed database.
        self.executor = executor
        # The one miss path (see the module's docstring): the service's
        # coordinator, whose capacity and metadata the service sets, or our own
        # (``standalone``).
        self.fills = fills
        self.retries = retries  # prefetch_retries
        self._slots = asyncio.Semaphore(concurrency)  # prefetch_concurrency
        self._in_flight: set[str] = set()

    @classmethod
    def standalone(
        cls,
        config: PrefetchConfig,
        cache: ImageCache,
        upstream: Upstream,
        capacity: Capacity | None = None,
        *,
        backoff: float = 0.5,
    ) -> Prefetcher:
        """A prefetcher with its own coordinator and origin answers (the CLI's, not a service's)."""
        metadata = metadata_for(
            cache.layout.lock_dir,
            upstream,
            config.metadata_cache_ttl,
            config.fill.upstream_timeout,
        )
        fills = FillCoordinator(
            config.fill, cache, upstream, NO_EVENTS, None, capacity=capacity, metadata=metadata
        )
        return cls(
            cache,
            upstream,
            fills=fills,
            metadata=metadata,
            concurrency=config.prefetch_concurrency,
            retries=config.prefetch_retries,
            backoff=backoff,
        )

    def _run(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    async def run(
        self,
        image_ids: Iterable[str] | None = None,
        progress: Callable[[str, PrefetchOutcome], None] | None = None,
    ) -> PrefetchReport:
        """Prefetch ``image_ids`` (default: the whole queue); never raises for one image."""
        ids = list(image_ids) if image_ids is not None else self.cache.get_queued_images()
        report = PrefetchReport()

        async def one(image_id: str) -> None:
            outcome, error = await self.fetch(image_id)
            report.outcomes[image_id] = outcome
            if error is not None:
                report.errors[image_id] = error
            if progress is not None:
                progress(image_id, outcome)

        await asyncio.gather(*(one(image_id) for image_id in ids))
        return report

    async def fetch(
        self, image_id: str, caller: Caller = SERVICE
    ) -> tuple[PrefetchOutcome, str | None]:
        """Prefetch one image; the outcome and, for a failure, the error recorded."""
        if image_id in self._in_flight:
            return PrefetchOutcome.BEING_CACHED, None
        self._in_flight.add(image_id)
        try:
            async with self._slots:
                return await self._fetch_with_retries(image_id, caller)
        finally:
            self._in_flight.discard(image_id)

    async def _fetch_with_retries(
        self, image_id: str, caller: Caller
    ) -> tuple[PrefetchOutcome, str | None]:
        retries = self.retries
        attempt = 0
        while True:
            attempt += 1
            try:
                outcome = await self._fill(image_id, caller)
            except asyncio.CancelledError:
                raise
            except (UpstreamError, ImageCacheError, OSError) as exc:
                transient = isinstance(exc, UpstreamError) and not isinstance(exc, _PERMANENT)
                if transient and attempt <= retries:
                    delay = self.backoff * 2 ** (attempt - 1)
                    log.info(
                        "prefetch of %s failed (%s); try %d of %d in %.1fs",
                        image_id,
                        exc,
                        attempt + 1,
                        retries + 1,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                message = str(exc) or type(exc).__name__
                refused = isinstance(exc, UpstreamNotFound | UpstreamForbidden)
                if caller.service and refused and self.upstream.kind == "glance":
                    # Glance answers 404 for a private image the asker may not
                    # see: for the cache's own account that is a missing role.
                    message += (
                        " (the cache fetched it as itself: its Keystone account, or no "
                        "identity without [keystone], needs a role that may download this "
                        "image, admin for other projects' private images; docs/openstack.md)"
                    )
                log.warning("prefetch of %s failed after %d tries: %s", image_id, attempt, message)
                await self._run(self._note_failure, image_id, message, attempt)
                return PrefetchOutcome.FAILED, message
            if outcome is PrefetchOutcome.NOT_CACHEABLE:
                message = "not cacheable: larger than the largest cacheable image, or no space"
                await self._run(self._note_failure, image_id, message, attempt)
                return outcome, message
            if outcome is not PrefetchOutcome.BEING_CACHED:
                await self._run(self._done, image_id)
            return outcome, None

    def _note_failure(self, image_id: str, message: str, attempts: int) -> None:
        if self.cache.is_queued(image_id):
            record_error(self.cache.layout, image_id, message, attempts)

    def _done(self, image_id: str) -> None:
        # The commit removes the marker of a fill we made; an image found
        # already cached still has its marker, which is now pointless.
        self.cache.delete_queued_image(image_id)
        clear_error(self.cache.layout, image_id)

    async def _fill(self, image_id: str, caller: Caller) -> PrefetchOutcome:
        """One try at caching ``image_id``, as a detached flight; raises what went wrong."""
        image_id = self.cache.layout.accept(image_id)  # InvalidImageId: a failure
        if await self._run(self.cache.is_cached, image_id):
            return PrefetchOutcome.ALREADY_CACHED
        info = await self.metadata.info(image_id, caller)
        if info.status != "active":
            raise UpstreamNotActive(image_id, info.status)
        flight = await self.fills.fill_detached(image_id, info, caller)
        if flight.kind is FlightKind.NONE and flight.reason == CACHED:
            return PrefetchOutcome.ALREADY_CACHED
        if flight.kind is FlightKind.NONE:
            # Too large, no room under the size limit, or the cache's disk failed.
            log.info("queued image %s not fetched: %s", image_id, flight.reason)
        # A fill that verified but could not commit leaves nothing cached.
        cached = await self._run(self.cache.is_cached, image_id)
        return PrefetchOutcome.CACHED if cached else PrefetchOutcome.NOT_CACHEABLE


__all__ = [
    "PrefetchOutcome",
    "PrefetchReport",
    "Prefetcher",
    "QueuedImage",
    "clear_error",
    "forget_stale_errors",
    "queued_details",
    "read_error",
    "record_error",
]
