"""The management verbs, one interface over a local cache directory or a running service.

The CLI only parses and renders; what each verb does lives here
(``LocalManager``, over an ``ImageCache``) or in ``client.py``
(``RemoteManager``, over the service's ``/v2/cache`` API). Both return the same
values, so every verb renders the same way in both modes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from imagecache.adopt import import_glance_cache
from imagecache.cache import ImageCache
from imagecache.capacity import Capacity
from imagecache.errors import (
    ConfigurationError,
    ImageNotCached,
    ImageNotQueued,
    NotInClusterMode,
)
from imagecache.prefetch import (
    PrefetchConfig,
    Prefetcher,
    forget_stale_errors,
    queued_details,
)
from imagecache.records import (
    AdoptReport,
    CachedImage,
    CleanResult,
    NodeListing,
    PrefetchReport,
    Progress,
    PruneResult,
    QueuedImage,
    QueueResult,
    ScrubOutcome,
    ScrubReport,
)
from imagecache.scrub import Scrubber

if TYPE_CHECKING:
    from imagecache.upstreams.base import Upstream


class CacheManager(Protocol):
    """What every management verb needs; implemented locally and over HTTP."""

    def list_cached(self) -> list[CachedImage]: ...
    def list_cluster(self) -> list[NodeListing]: ...
    def list_queued(self) -> list[QueuedImage]: ...
    def queue_image(self, image_id: str) -> QueueResult: ...
    def delete_cached_image(self, image_id: str) -> None: ...
    def delete_all_cached_images(self) -> int: ...
    def delete_queued_image(self, image_id: str) -> None: ...
    def delete_all_queued_images(self) -> int: ...
    def prune(self) -> PruneResult: ...
    def clean(self) -> CleanResult | None: ...
    def prefetch(self, start: Callable[[int], Progress]) -> PrefetchReport: ...
    def verify(self, image_id: str | None, start: Callable[[int], Progress]) -> ScrubReport: ...
    def stats(self) -> dict[str, Any]: ...
    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        """Pin or unpin; False when the image already was in that state."""
        ...

    def import_glance_cache(self, source: Path, keep_source: bool) -> AdoptReport: ...
    def close(self) -> None: ...


class LocalManager:
    """The verbs on a cache directory this process can open."""

    def __init__(
        self,
        cache: ImageCache,
        prefetch: PrefetchConfig,
        origin: Callable[[], Upstream] | None,
    ) -> None:
        self.cache = cache
        # For the prefetch verb alone: its own coordinator's values, and how to
        # open the upstream (None: none is configured), both built by the CLI.
        self.prefetch_config = prefetch
        self.origin = origin

    def close(self) -> None:
        self.cache.close()

    def list_cached(self) -> list[CachedImage]:
        return self.cache.get_cached_images()

    def list_cluster(self) -> list[NodeListing]:
        driver = self.cache.central
        if driver is None:
            raise NotInClusterMode("listing every node's cache (--all-nodes)")
        return driver.cluster_listing()

    def list_queued(self) -> list[QueuedImage]:
        return queued_details(self.cache)

    def queue_image(self, image_id: str) -> QueueResult:
        image_id = self.cache.layout.validate(image_id)  # the CLI's edge: checked once, here
        return self.cache.queue_image(image_id)

    def delete_cached_image(self, image_id: str) -> None:
        image_id = self.cache.layout.validate(image_id)  # the CLI's edge: checked once, here
        # Glance's DELETE /v2/cache/{id} removes the copy and the marker; an id
        # that is neither is unknown.
        deleted = self.cache.delete_cached_image(image_id)
        unqueued = self.cache.delete_queued_image(image_id)
        if not (deleted or unqueued):
            raise ImageNotCached(image_id)

    def delete_all_cached_images(self) -> int:
        return self.cache.delete_all_cached_images()

    def delete_queued_image(self, image_id: str) -> None:
        image_id = self.cache.layout.validate(image_id)  # the CLI's edge: checked once, here
        if not self.cache.delete_queued_image(image_id):
            raise ImageNotQueued(image_id)
        forget_stale_errors(self.cache)

    def delete_all_queued_images(self) -> int:
        count = self.cache.delete_all_queued_images()
        forget_stale_errors(self.cache)
        return count

    def prune(self) -> PruneResult:
        return self.cache.prune()

    def clean(self) -> CleanResult:
        return self.cache.clean()

    def prefetch(self, start: Callable[[int], Progress]) -> PrefetchReport:
        origin = self.origin
        if origin is None:
            raise ConfigurationError(
                "prefetch needs an upstream: set upstream in the config file or pass --upstream"
            )
        queued = self.cache.get_queued_images()
        advance = start(len(queued))

        async def run() -> PrefetchReport:
            upstream = origin()
            try:
                capacity = Capacity(self.cache)
                config = self.prefetch_config
                prefetcher = Prefetcher.standalone(config, self.cache, upstream, capacity)
                return await prefetcher.run(queued, lambda i, _o: advance(i, 1))
            finally:
                await upstream.close()

        return asyncio.run(run())

    def verify(self, image_id: str | None, start: Callable[[int], Progress]) -> ScrubReport:
        if image_id is not None:
            image_id = self.cache.layout.validate(image_id)  # the CLI's edge
            image = self.cache.get_cached_image(image_id)
            if image is None:
                raise ImageNotCached(image_id)
            images = [image]
        else:
            images = self.cache.get_cached_images()
        advance = start(sum(image.size for image in images))
        # A verify the operator asked for runs at full speed; the scrub in the
        # service is the one that must stay polite.
        scrubber = Scrubber(self.cache, bytes_per_second=0)

        def step(image: str, _outcome: ScrubOutcome, read: int) -> None:
            advance(image, read)

        return scrubber.run([image.image_id for image in images], step)

    def stats(self) -> dict[str, Any]:
        return local_stats(self.cache)

    def set_pinned(self, image_id: str, pinned: bool) -> bool:
        image_id = self.cache.layout.validate(image_id)  # the CLI's edge: checked once, here
        # Read first to say "was not pinned": the drivers' set_pinned only
        # reports whether the image is cached. A pin racing this one can make
        # the answer stale, never the resulting state wrong.
        image = self.cache.get_cached_image(image_id)
        if image is None:
            raise ImageNotCached(image_id)
        if image.pinned == pinned:
            return False
        if not (self.cache.pin(image_id) if pinned else self.cache.unpin(image_id)):
            raise ImageNotCached(image_id)
        return True

    def import_glance_cache(self, source: Path, keep_source: bool) -> AdoptReport:
        return import_glance_cache(self.cache, source, keep_source=keep_source)


def local_stats(cache: ImageCache) -> dict[str, Any]:
    """Counts and sizes an operator watches; the service's ``/v2/cache/stats`` too."""
    layout = cache.layout
    images = cache.get_cached_images()
    queued = queued_details(cache)
    size = sum(image.size for image in images)
    limit = cache.max_size
    usage = shutil.disk_usage(layout.base)
    return {
        "cached_images": len(images),
        "cached_bytes": size,
        "max_size": limit,
        "usage_percent": round(100.0 * size / limit, 1) if limit else None,
        "pinned_images": sum(1 for image in images if image.pinned),
        "total_hits": sum(image.hits for image in images),
        "never_read": sum(1 for image in images if image.hits == 0),
        "queued_images": len(queued),
        "queued_with_errors": sum(1 for q in queued if q.error),
        "incomplete_files": sum(1 for _ in layout.iter_images(layout.incomplete_dir)),
        "invalid_files": sum(1 for _ in layout.iter_images(layout.invalid_dir)),
        "disk_free_bytes": usage.free,
        "free_space_watermark": cache.free_space_watermark,
        "driver": cache.driver_name,
        "cache_dir": os.fspath(layout.base),
    }
