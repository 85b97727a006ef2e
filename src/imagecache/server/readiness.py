"""``GET /healthcheck/ready``: whether this process can do its job, check by check.

``/healthcheck`` stays what oslo.middleware's is, liveness: the process
answers. Readiness asks what a load balancer or an operator needs to know
before sending downloads here, and says which part failed:

- ``origin``: the origin answers (a directory origin exists and is readable;
  an http origin's root, Glance's ``/versions``, an s3 bucket answer);
- ``database`` (cluster mode only): the central database answers a query
  (the detail says how many images have changes queued for it: a node
  without its database serves hits and fills, but is not ready);
- ``cache_dir``: a file can be created in the cache directory (a disk
  remounted read-only fails here);
- ``free_space``: the cache's filesystem has at least ``free_space_watermark``
  free (below it, new images are streamed through, not cached).

The answer is JSON, ``{"ready": bool, "checks": {name: {"ok": bool,
"detail": str}}}``, with HTTP 200 when every check passes and 503 otherwise.
Like ``/healthcheck`` and ``/metrics`` it needs no token: probes carry none.
Each check is bounded by ``upstream_timeout``; they run concurrently.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from imagecache.cluster import central_driver
from imagecache.errors import CacheStoreError, CacheUnavailable, ImageCacheError
from imagecache.layout import write_probe
from imagecache.server.state import STATE, ServiceState


async def ready(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    checks: dict[str, Callable[[ServiceState], Awaitable[str]]] = {
        "origin": _origin,
        "cache_dir": _cache_dir,
        "free_space": _free_space,
    }
    if central_driver(state.cache) is not None:
        checks["database"] = _database
    results = await asyncio.gather(*(_run(check, state) for check in checks.values()))
    body: dict[str, Any] = {"ready": all(ok for ok, _ in results), "checks": {}}
    for name, (ok, detail) in zip(checks, results, strict=True):
        body["checks"][name] = {"ok": ok, "detail": detail}
    return web.json_response(body, status=200 if body["ready"] else 503)


async def _run(
    check: Callable[[ServiceState], Awaitable[str]], state: ServiceState
) -> tuple[bool, str]:
    timeout = state.settings.upstream_timeout
    try:
        return True, await asyncio.wait_for(check(state), timeout)
    except TimeoutError:
        return False, f"no answer within {timeout:g} s"
    except (ImageCacheError, OSError) as exc:  # a check that fails says why in its message
        return False, str(exc)


async def _origin(state: ServiceState) -> str:
    return await state.upstream.check_reachable()


async def _cache_dir(state: ServiceState) -> str:
    return await state.fills.run(_probe_write, state)


def _probe_write(state: ServiceState) -> str:
    layout = state.cache.driver.layout
    # In .locks/: a hidden name, on the same filesystem as the images.
    error = write_probe(layout.lock_dir)
    if error is not None:
        raise CacheUnavailable(
            f"cannot write in the cache directory {layout.base}: {error.strerror}"
        )
    return f"the cache directory {layout.base} is writable"


async def _free_space(state: ServiceState) -> str:
    base = state.cache.driver.layout.base
    st = await state.fills.run(os.statvfs, base)
    free = st.f_bavail * st.f_frsize
    watermark = state.settings.free_space_watermark
    if free < watermark:
        raise CacheUnavailable(
            f"{free} bytes free on the filesystem of {base}, below free_space_watermark"
            f" ({watermark}): new images are streamed, not cached"
        )
    return f"{free} bytes free on the filesystem of {base} (watermark {watermark})"


async def _database(state: ServiceState) -> str:
    driver = central_driver(state.cache)
    assert driver is not None
    return await state.fills.run(_ping, driver)


def _ping(driver: Any) -> str:
    ok, detail = driver.database_state()
    if not ok:
        raise CacheStoreError(str(detail))
    return str(detail)
