"""Automatic maintenance inside the service: no cron jobs.

Jobs, each on its own interval setting (0 disables it):

- ``prune``  (``prune_interval``): evict LRU entries over the size limit, and
  entries unread for longer than ``idle_ttl`` (when set); pinned ones never.
- ``clean``  (``clean_interval``): delete ``invalid/`` and stalled fills.
- ``queue``  (``queue_interval``): re-drive the queue through the prefetcher,
  so an entry whose fill failed (or was queued by another process) is retried.
- ``scrub``  (``scrub_interval``): re-hash cached files at a limited rate.
- ``usage``  (every ``USAGE_INTERVAL`` seconds): sample the cached bytes, the
  free disk and whether the metadata store answers, for ``/metrics`` (a
  scrape runs on the event loop and must not query the database itself).

Plus a one-off ``reconcile`` at start-up, in the background, so serving starts
at once. Every job's blocking work runs in a thread, under the same
cross-process lock (``ImageCache.exclusive``) as the manual API calls, so a
manual prune and a scheduled one never run at once, in any worker.

``start()`` and ``stop()`` are all a front end calls: the service ties them to
its app's start and shutdown (``server/operations.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from imagecache.cache import ImageCache
from imagecache.errors import ImageCacheError
from imagecache.metadata import sweep_answers
from imagecache.prefetch import Prefetcher, forget_stale_errors
from imagecache.reconcile import ReconcileReport
from imagecache.records import PruneResult
from imagecache.scrub import Scrubber

if TYPE_CHECKING:
    from imagecache.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

USAGE_INTERVAL = 15.0


@dataclass(frozen=True)
class Usage:
    """What the cache holds and has room for, as of ``sampled_at`` (epoch seconds)."""

    cached_bytes: int | None
    disk_free_bytes: int | None
    metadata_up: bool
    sampled_at: float


def sample_usage(cache: ImageCache) -> Usage:
    """One sample; a metadata store that fails is reported down, never raised."""
    try:
        cached: int | None = cache.get_cache_size()
        up = True
    except ImageCacheError:
        cached, up = None, False
    try:
        st = os.statvfs(cache.layout.base)
        free: int | None = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    return Usage(cached, free, up, time.time())


def evict_idle(cache: ImageCache, ttl: float, now: float | None = None) -> PruneResult:
    """Evict unpinned entries not read for ``ttl`` seconds; 0 = never."""
    if not ttl:
        return PruneResult(0, 0)
    cutoff = (time.time() if now is None else now) - ttl
    files = freed = 0
    with cache.exclusive("prune"):
        for image in cache.get_cached_images():
            if image.pinned or image.last_accessed >= cutoff:
                continue
            if cache.delete_cached_image(image.image_id):
                files += 1
                freed += image.size
    if files:
        log.info("evicted %d images idle for over %ds (%d bytes)", files, ttl, freed)
    return PruneResult(files, freed)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """What the jobs read: their intervals (0: never), the idle TTL, the scrub's rate."""

    prune_interval: float
    clean_interval: float
    queue_interval: float
    scrub_interval: float
    idle_ttl: int
    scrub_bytes_per_second: int

    @classmethod
    def of(cls, settings: Settings) -> Schedule:
        """The settings' values of the same names (built once, by whoever wires the jobs)."""
        return cls(
            prune_interval=settings.prune_interval,
            clean_interval=settings.clean_interval,
            queue_interval=settings.queue_interval,
            scrub_interval=settings.scrub_interval,
            idle_ttl=settings.idle_ttl,
            scrub_bytes_per_second=settings.scrub_bytes_per_second,
        )


class Maintenance:
    """The scheduled jobs of one service process."""

    def __init__(
        self,
        cache: ImageCache,
        schedule: Schedule,
        prefetcher: Prefetcher | None = None,
        scrubber: Scrubber | None = None,
    ) -> None:
        self.cache = cache
        self.plan = schedule
        self.prefetcher = prefetcher
        self.scrubber = (
            scrubber if scrubber is not None else Scrubber(cache, schedule.scrub_bytes_per_second)
        )
        self.runs: Counter[str] = Counter()
        # Images evicted by the scheduled prune, by reason ("size_limit", "idle_ttl").
        self.evicted: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.last_result: dict[str, Any] = {}
        self.reconciled: ReconcileReport | None = None
        self.usage: Usage | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Blocking work runs here, and stop() waits for what is still running:
        # a cancelled task cannot stop its thread, and a thread left querying
        # a database the caller then closes would crash the process.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="imagecache-maintenance"
        )
        self._running: set[concurrent.futures.Future[Any]] = set()
        self._started_at = time.time()
        self._changed = asyncio.Condition()

    # --- the jobs (each also callable on its own) ----------------------------------------------

    async def prune(self) -> PruneResult:
        ttl = self.plan.idle_ttl
        idle = await self._in_thread(evict_idle, self.cache, ttl)
        over = await self._in_thread(self.cache.prune)
        self.evicted["idle_ttl"] += idle.files
        self.evicted["size_limit"] += over.files
        return PruneResult(idle.files + over.files, idle.bytes + over.bytes)

    async def clean(self) -> Any:
        result = await self._in_thread(self.cache.clean)
        await self._in_thread(forget_stale_errors, self.cache)
        await self._in_thread(sweep_answers, self.cache.layout.lock_dir)
        return result

    async def redrive_queue(self) -> Any:
        if self.prefetcher is None:
            return None
        waiting = await self._in_thread(self.cache.get_queued_images)
        ids = [i for i in waiting if i not in self.prefetcher.in_flight]
        if not ids:
            return None
        return (await self.prefetcher.run(ids)).as_dict()

    async def scrub(self) -> Any:
        interval = self.plan.scrub_interval
        stamp = self.cache.layout.lock_path("scrub.done")

        def run() -> Any:
            with self.cache.exclusive("scrub"):
                # Every worker process schedules a scrub; the first to get the
                # lock does it and the others find it just done and skip.
                try:
                    since = time.time() - stamp.stat().st_mtime
                except FileNotFoundError:
                    since = float("inf")
                if interval and since < interval / 2:
                    return None
                report = self.scrubber.run().as_dict()
                stamp.touch()
                return report

        return await self._in_thread(run)

    async def sample_usage(self) -> Usage:
        self.usage = await self._in_thread(sample_usage, self.cache)
        return self.usage

    async def reconcile(self) -> ReconcileReport:
        def run() -> ReconcileReport:
            with self.cache.exclusive("reconcile"):  # one worker at a time
                return self.cache.reconcile(self._started_at)

        self.reconciled = await self._in_thread(run)
        return self.reconciled

    def _in_thread(self, func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        future = self._executor.submit(func, *args)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return asyncio.wrap_future(future)

    def schedule(self) -> dict[str, tuple[float, Callable[[], Awaitable[Any]]]]:
        plan = self.plan
        return {
            "prune": (plan.prune_interval, self.prune),
            "clean": (plan.clean_interval, self.clean),
            "queue": (plan.queue_interval, self.redrive_queue),
            "scrub": (plan.scrub_interval, self.scrub),
        }

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._started_at = time.time()
        self._tasks.append(asyncio.create_task(self._once("reconcile", self.reconcile)))
        self._tasks.append(asyncio.create_task(self._once("usage", self.sample_usage)))
        self._tasks.append(
            asyncio.create_task(self._every("usage", USAGE_INTERVAL, self.sample_usage))
        )
        for name, (interval, job) in self.schedule().items():
            if interval > 0:
                self._tasks.append(asyncio.create_task(self._every(name, interval, job)))

    async def stop(self) -> None:
        self.scrubber.stop()  # a scrub in a thread notices between chunks
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        running = [asyncio.wrap_future(future) for future in list(self._running)]
        if running:
            await asyncio.wait(running)
        self._executor.shutdown(wait=False)  # idle by now; a Maintenance runs once

    async def wait_for(self, name: str, runs: int) -> None:
        """Wait until job ``name`` has completed ``runs`` times; wrap in ``asyncio.timeout``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.runs[name] >= runs)

    async def _every(self, name: str, interval: float, job: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._once(name, job)

    async def _once(self, name: str, job: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.last_result[name] = await job()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A job that fails must not stop its schedule: log and try next time.
            log.exception("maintenance job %s failed", name)
            self.failures[name] += 1
        async with self._changed:
            self.runs[name] += 1
            self._changed.notify_all()
