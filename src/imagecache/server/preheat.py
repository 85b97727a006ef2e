"""Preheat jobs in the service: the admin routes, and this node running its own items.

::

    POST /v2/cache/preheat            {"images": [ID, ...], "nodes": ["all" | SITE | URL, ...]}
                                      202 {"id": N, "href": "/v2/cache/preheat/N"}
    GET  /v2/cache/preheat            200 {"jobs": [...]}: newest first (?limit=N, ?state=S)
    GET  /v2/cache/preheat/{job_id}   200 the job: per node, per image, its state and reason
    DELETE /v2/cache/preheat/{job_id} 200 the job, cancelled: its pending items never run

All are admin only (``auth.admin_only``, as every management route),
and need the central driver (409 otherwise): a job's state is in the cluster
database (``drivers/central/preheat.py``) so that any node answers for it.

Each node runs its own items, never another's: with every heartbeat
(``ClusterTasks.after_beat``) ``PreheatRunner`` claims up to
``prefetch_concurrency`` of its pending items and fills each through the
prefetcher, the queue worker's path (retries, the single-flight fill
coordinator joined detached, the sibling-then-origin choice of cluster mode).
The node that took the request starts at once; the others within a
heartbeat interval.

Items are fetched as the cache itself (``SERVICE``): the job runs later, on
other nodes, and a caller's token is never written to the database. With a
Glance origin the cache's Keystone account must be allowed to download the
images, as for any queued fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from imagecache.errors import (
    BadPreheatRequest,
    BadRequest,
    ImageCacheError,
    NeedsClusterMode,
    NotInClusterMode,
    ResourceNotFound,
)
from imagecache.prefetch import Prefetcher
from imagecache.records import PrefetchOutcome
from imagecache.server.auth import admin_only
from imagecache.server.cache_api import WORKER
from imagecache.server.cluster import CLUSTER_TASKS
from imagecache.server.state import STATE, ServiceState
from imagecache.upstreams.base import SERVICE

if TYPE_CHECKING:
    from imagecache.drivers.central import CentralDriver

log = logging.getLogger(__name__)

PREHEAT_PATH = "/v2/cache/preheat"
# The item states, as drivers/central/preheat.py writes them (not imported: that
# module pulls in SQLAlchemy, which a node of another driver never loads).
_CACHED, _FAILED, _SKIPPED, _PENDING = "cached", "failed", "skipped", "pending"


class PreheatRunner:
    """This node's preheat items, a few at a time, each through the prefetcher."""

    def __init__(self, driver: CentralDriver, prefetcher: Prefetcher, concurrency: int) -> None:
        self.driver = driver
        self.prefetcher = prefetcher
        self.concurrency = concurrency
        self._running: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()  # the heartbeat's tick and a new job's nudge, one at a time
        self._nudges: set[asyncio.Task[None]] = set()
        self._stopped = False

    async def tick(self) -> None:
        """Renew the claims of the items running here, and claim more while there is room."""
        async with self._lock:
            # With the database away (the beat's sync found it so), claiming would
            # only wait out another connect timeout: the items wait for its return.
            if self._stopped or self.driver.offline:
                return
            if self._running:
                await asyncio.to_thread(self.driver.touch_preheat_items, list(self._running))
            room = self.concurrency - len(self._running)
            claimed = await asyncio.to_thread(self.driver.claim_preheat_items, room)
            for key in claimed:
                if key in self._running:
                    continue  # our own claim, renewed late: it is still running here
                task = asyncio.create_task(self._run(*key), name=f"preheat {key[0]} {key[1]}")
                self._running[key] = task
                task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: tuple[int, str], _task: asyncio.Task[None]) -> None:
        self._running.pop(key, None)

    def nudge(self) -> None:
        """Claim now rather than at the next heartbeat (a job was just made here)."""
        task = asyncio.create_task(self._nudged(), name="preheat nudge")
        self._nudges.add(task)
        task.add_done_callback(self._nudges.discard)

    async def _nudged(self) -> None:
        try:
            await self.tick()
        except Exception as exc:
            log.warning("could not claim preheat items now (the next heartbeat will): %s", exc)

    async def _run(self, job_id: int, image_id: str) -> None:
        try:
            outcome, error = await self.prefetcher.fetch(image_id, SERVICE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the item says so; the service goes on
            log.exception("preheat of %s (job %d) failed", image_id, job_id)
            outcome, error = PrefetchOutcome.FAILED, str(exc) or type(exc).__name__
        state, reason = _item_state(outcome, error)
        size = None
        try:
            if state in (_CACHED, _SKIPPED):
                image = await asyncio.to_thread(self.driver.get_cached_image, image_id)
                size = image.size if image is not None else None
            await asyncio.to_thread(
                self.driver.finish_preheat_item, job_id, image_id, state, reason, size
            )
        except ImageCacheError as exc:
            # The claim lapses and this node runs the item again (then finds it cached).
            log.warning("could not record preheat of %s (job %d): %s", image_id, job_id, exc)
        else:
            log.info("preheat job %d: %s %s (%s)", job_id, image_id, state, reason or "-")

    async def stop(self) -> None:
        """Cancel the items running here and hand them back as pending for a later run."""
        async with self._lock:
            self._stopped = True
            tasks = list(self._running.items())
        for _key, task in tasks:
            task.cancel()
        for task in [*self._nudges]:
            task.cancel()
        await asyncio.gather(*(t for _k, t in tasks), *self._nudges, return_exceptions=True)
        for (job_id, image_id), _task in tasks:
            with contextlib.suppress(ImageCacheError):  # else its claim lapses: the same end
                await asyncio.to_thread(self.driver.finish_preheat_item, job_id, image_id, _PENDING)


def _item_state(outcome: PrefetchOutcome, error: str | None) -> tuple[str, str | None]:
    if outcome is PrefetchOutcome.CACHED:
        return _CACHED, None
    if outcome is PrefetchOutcome.ALREADY_CACHED:
        return _SKIPPED, "already cached"
    if outcome is PrefetchOutcome.BEING_CACHED:
        # Another prefetch of the image runs here now: try again next beat,
        # when it will have ended (then "already cached", or its own failure).
        return _PENDING, None
    return _FAILED, error or outcome.value


RUNNER = web.AppKey("preheat_runner", PreheatRunner)


def install(app: web.Application) -> None:
    """The preheat routes (before ``/v2/cache/{image_id}``) and, in cluster mode, the runner."""
    state = app[STATE]
    driver = state.cache.central
    prefetcher = app[WORKER].prefetcher
    if driver is not None and prefetcher is not None and CLUSTER_TASKS in app:
        runner = PreheatRunner(driver, prefetcher, state.settings.prefetch_concurrency)
        app[RUNNER] = runner
        app[CLUSTER_TASKS].after_beat.append(runner.tick)

        async def on_shutdown(_app: web.Application) -> None:
            # Before the fills drain (app.py's _stop_fills comes later).
            await runner.stop()

        app.on_shutdown.append(on_shutdown)
    app.router.add_route("*", PREHEAT_PATH, admin_only({"GET": list_jobs, "POST": create_job}))
    app.router.add_route(
        "*", PREHEAT_PATH + "/{job_id}", admin_only({"GET": get_job, "DELETE": cancel_job})
    )


def _central(state: ServiceState) -> CentralDriver:
    driver = state.cache.central
    if driver is None:
        raise NeedsClusterMode(
            NotInClusterMode("a preheat job (its state is in the cluster database)")
        )
    return driver


async def create_job(request: web.Request, state: ServiceState) -> web.StreamResponse:
    driver = _central(state)
    images, target = _parse(await request.read())
    try:
        job_id = await asyncio.to_thread(driver.create_preheat_job, images, target)
    except (BadPreheatRequest, ValueError) as exc:  # InvalidImageId is a ValueError
        raise BadRequest(str(exc)) from exc
    log.info("preheat job %d: %d images on %s", job_id, len(images), ",".join(target))
    runner = request.app.get(RUNNER)
    if runner is not None:
        runner.nudge()
    href = f"{PREHEAT_PATH}/{job_id}"
    return web.json_response({"id": job_id, "href": href}, status=202, headers={"Location": href})


def _parse(raw: bytes) -> tuple[list[str], list[str]]:
    """``images`` and ``nodes`` of the body; 400 naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body must be JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(
            'the body must be a JSON object, e.g. {"images": ["ID"], "nodes": ["all"]}'
        )
    images = body.get("images")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise BadRequest("images must be a list of image ids")
    if not images:
        raise BadRequest("images is empty: name at least one image to preheat")
    # No default: "every node" is a choice to make, not to fall into.
    nodes: Any = body.get("nodes")
    if nodes is None:
        raise BadRequest("nodes is missing: 'all', a site, or a list of node URLs")
    if isinstance(nodes, str):
        nodes = [nodes]
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise BadRequest("nodes must be 'all', a site, or a list of node URLs")
    return images, nodes


def _number(raw: str, what: str) -> int:
    """A decimal number of a path or query (ASCII digits only: int() takes others); 400 if not."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise BadRequest(f"{what} must be a number, not {raw[:40]!r}")
    return int(raw)


async def get_job(request: web.Request, state: ServiceState) -> web.StreamResponse:
    driver = _central(state)
    job_id = _number(request.match_info["job_id"], "job id")
    job = await asyncio.to_thread(driver.get_preheat_job, job_id)
    if job is None:
        raise ResourceNotFound(f"no preheat job {job_id}")
    return web.json_response(job.as_dict())


_LIST_PARAMETERS = frozenset({"limit", "state"})


async def list_jobs(request: web.Request, state: ServiceState) -> web.StreamResponse:
    """The newest jobs first, each with its counts (``?limit=N&state=running|done|cancelled``)."""
    driver = _central(state)
    for name in request.query:
        if name not in _LIST_PARAMETERS:
            raise BadRequest(f"unknown parameter {name[:40]!r}: the job list takes limit and state")
    raw_limit = request.query.getall("limit", [])
    raw_state = request.query.getall("state", [])
    if len(raw_limit) > 1 or len(raw_state) > 1:
        raise BadRequest("give limit and state at most once each")
    limit = _number(raw_limit[0], "limit") if raw_limit else None
    wanted = raw_state[0] if raw_state else None
    jobs = await asyncio.to_thread(driver.list_preheat_jobs, limit, wanted)
    return web.json_response({"jobs": [job.as_dict() for job in jobs]})


async def cancel_job(request: web.Request, state: ServiceState) -> web.StreamResponse:
    """Cancel a job's pending items; 200 with the job (again for a job cancelled already).

    Items a node is filling now finish there (docs/cluster.md, "Preheat jobs").
    404 for an unknown job, 409 (PreheatJobFinished) for one whose every item ended.
    """
    driver = _central(state)
    job_id = _number(request.match_info["job_id"], "job id")
    cancelled = await asyncio.to_thread(driver.cancel_preheat_job, job_id)
    if cancelled is None:
        raise ResourceNotFound(f"no preheat job {job_id}")
    job, marked = cancelled
    log.info("preheat job %d cancelled: %d pending items will not run", job_id, marked)
    return web.json_response({**job.as_dict(), "cancelled_now": marked})


__all__ = ["RUNNER", "PreheatRunner", "install"]
