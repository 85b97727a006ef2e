"""The operations layer of the service: size limit, prefetch retries, maintenance, extra routes.

``install(app, capacity, prefetcher)`` is called once by ``create_app``, which
builds the hard size limit (``capacity.Capacity``, given to the fill
coordinator) and the prefetcher (retries, recorded errors; given to the queue
worker), after the shared state and the queue worker exist and before the
``/v2/cache/{image_id}`` routes (so the static paths here win). It adds:

- the size limit's and the prefetcher's app keys and metrics;
- scheduled maintenance (``maintenance.Maintenance``), started with the app and
  stopped on shutdown, before fills are drained;
- admin routes beyond Glance's API::

    GET    /v2/cache/stats            counts, sizes, limits, maintenance runs
    POST   /v2/cache/verify           {"image_id": ID} or {} for all: re-hash, quarantine
    PUT    /v2/cache/{image_id}/pin   204; 404 when not cached
    DELETE /v2/cache/{image_id}/pin   204; 404 when not cached
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagecache.capacity import Capacity
from imagecache.errors import BadRequest, ResourceNotFound
from imagecache.maintenance import Maintenance, Schedule
from imagecache.manage import local_stats
from imagecache.prefetch import Prefetcher
from imagecache.scrub import Scrubber
from imagecache.server import background
from imagecache.server.auth import admin_only
from imagecache.server.state import STATE, ServiceState

CAPACITY = web.AppKey("capacity", Capacity)
MAINTENANCE_KEY = web.AppKey("imagecache.maintenance", Maintenance)


def install(app: web.Application, capacity: Capacity, prefetcher: Prefetcher) -> None:
    """Maintenance and its routes, over the size limit and prefetcher ``create_app`` built."""
    state = app[STATE]
    app[CAPACITY] = capacity
    maintenance = Maintenance(state.cache, Schedule.of(state.settings), prefetcher)
    _attach(app, maintenance)
    state.metrics.registry.register(_OperationsCollector(state, capacity, maintenance))
    app.router.add_route("*", "/v2/cache/stats", admin_only({"GET": stats}))
    app.router.add_route("*", "/v2/cache/verify", admin_only({"POST": verify}))
    app.router.add_route("*", "/v2/cache/{image_id}/pin", admin_only({"PUT": pin, "DELETE": unpin}))


def _attach(app: web.Application, maintenance: Maintenance) -> None:
    """Run ``maintenance`` while ``app`` serves."""
    app[MAINTENANCE_KEY] = maintenance

    async def on_shutdown(_app: web.Application) -> None:
        # Before the fills are drained: a re-drive must not start new ones.
        await maintenance.stop()

    app.on_shutdown.append(on_shutdown)
    # Reconciliation and the schedule start once the socket accepts (server/background.py).
    background.add(app, maintenance.start)


class _OperationsCollector(Collector):
    """Metrics of the operations layer, read from in-memory counters when scraped.

    Nothing here touches the disk or the database: a scrape runs on the event loop
    (what the cache holds comes from the maintenance's periodic ``usage`` sample).
    """

    def __init__(self, state: ServiceState, capacity: Capacity, maintenance: Maintenance) -> None:
        self.state = state
        self.capacity = capacity
        self.maintenance = maintenance

    def collect(self) -> Iterator[Metric]:
        settings = self.state.settings
        yield GaugeMetricFamily(
            "imagecache_max_size_bytes",
            "The size limit, image_cache_max_size",
            settings.image_cache_max_size,
        )
        yield GaugeMetricFamily(
            "imagecache_free_space_watermark_bytes",
            "The free space kept on the cache's filesystem, free_space_watermark",
            settings.free_space_watermark,
        )
        usage = self.maintenance.usage
        if usage is not None:
            if usage.cached_bytes is not None:
                yield GaugeMetricFamily(
                    "imagecache_cached_bytes",
                    "Bytes of committed images, as of the last sample (every 15 s)",
                    usage.cached_bytes,
                )
            if usage.disk_free_bytes is not None:
                yield GaugeMetricFamily(
                    "imagecache_disk_free_bytes",
                    "Free bytes on the cache's filesystem, as of the last sample",
                    usage.disk_free_bytes,
                )
            yield GaugeMetricFamily(
                "imagecache_database_up",
                "1 if the metadata database this node reads (sqlite; for the central driver "
                "its local mirror, see imagecache_cluster_database_up) answered the last "
                "sample, else 0",
                1 if usage.metadata_up else 0,
            )
        yield GaugeMetricFamily(
            "imagecache_oldest_fill_age_seconds",
            "Age of the oldest fill this process is writing (0 with none)",
            self.state.fills.oldest_fill_age(),
        )
        yield GaugeMetricFamily(
            "imagecache_reserved_bytes",
            "Bytes reserved by fills in flight in this process",
            self.capacity.reserved_bytes(),
        )
        yield GaugeMetricFamily(
            "imagecache_ledger_entries",
            "Reservations (a file in .locks/reserved/ and a descriptor each) this process holds",
            self.capacity.ledger.count(),
        )
        open_fds = _open_descriptors()
        if open_fds is not None:
            yield GaugeMetricFamily(
                "imagecache_open_fds", "File descriptors this process has open", open_fds
            )
        evictions = CounterMetricFamily(
            "imagecache_evictions", "Images evicted, by reason", labels=["reason"]
        )
        evictions.add_metric(["reservation"], self.capacity.evictions)
        for reason in ("size_limit", "idle_ttl"):
            evictions.add_metric([reason], self.maintenance.evicted[reason])
        yield evictions
        yield CounterMetricFamily(
            "imagecache_scrub_quarantined",
            "Cached files the scrub found corrupt and moved to invalid/",
            self.maintenance.scrubber.quarantined,
        )
        runs = CounterMetricFamily(
            "imagecache_maintenance_runs", "Completed runs of each maintenance job", labels=["job"]
        )
        failures = CounterMetricFamily(
            "imagecache_maintenance_failures", "Failed runs of each maintenance job", labels=["job"]
        )
        for job in ("reconcile", "prune", "clean", "queue", "scrub"):
            runs.add_metric([job], self.maintenance.runs[job])
            failures.add_metric([job], self.maintenance.failures[job])
        yield runs
        yield failures


def _open_descriptors() -> int | None:
    """This process's open descriptors; None where ``/proc`` is missing.

    A listing of procfs, not of a disk, so cheap enough for a scrape on the loop.
    """
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


async def stats(request: web.Request, state: ServiceState) -> web.StreamResponse:
    values: dict[str, Any] = await state.fills.run(local_stats, state.cache)
    capacity = request.app[CAPACITY]
    maintenance = request.app[MAINTENANCE_KEY]
    values["reserved_bytes"] = capacity.reserved_bytes()
    values["capacity_evictions"] = capacity.evictions
    values["maintenance_runs"] = dict(maintenance.runs)
    values["maintenance_failures"] = dict(maintenance.failures)
    return web.json_response(values)


async def verify(request: web.Request, state: ServiceState) -> web.StreamResponse:
    image_id = await _verify_target(request, state)
    if (
        image_id is not None
        and await state.fills.run(state.cache.get_cached_image, image_id) is None
    ):
        raise ResourceNotFound(f"image {image_id} is not cached")

    def run() -> dict[str, Any]:
        # An operator's verify runs at full speed; the scheduled scrub is the polite one.
        scrubber = Scrubber(state.cache, bytes_per_second=0)
        with state.cache.exclusive("scrub"):
            return scrubber.run(None if image_id is None else [image_id]).as_dict()

    return web.json_response(await state.fills.run(run))


async def _verify_target(request: web.Request, state: ServiceState) -> str | None:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"the body must be JSON: {exc}") from exc
    except RecursionError as exc:
        # json's C parser recurses per nesting level: a body of a few thousand
        # "[" ends here, and is the caller's mistake, not a 500.
        raise BadRequest("the body is JSON nested too deeply") from exc
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object, e.g. {"image_id": "..."}')
    image_id = body.get("image_id")
    if image_id is None:
        return None
    return state.cache.layout.validate(image_id)  # InvalidImageId: 400


async def pin(request: web.Request, state: ServiceState) -> web.StreamResponse:
    return await _set_pinned(request, state, True)


async def unpin(request: web.Request, state: ServiceState) -> web.StreamResponse:
    return await _set_pinned(request, state, False)


async def _set_pinned(
    request: web.Request, state: ServiceState, pinned: bool
) -> web.StreamResponse:
    image_id = state.image_id(request)
    method = state.cache.pin if pinned else state.cache.unpin
    if not await state.fills.run(method, image_id):
        raise ResourceNotFound(f"image {image_id} is not cached")
    return web.Response(status=204)
