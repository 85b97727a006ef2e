"""Glance's cache management API, ``/v2/cache``, and the legacy ``cachemanage`` routes.

Status codes and bodies are Glance's (see ``reference/glance-cache.md`` §6).
As in Glance the policy is checked before anything else, so a caller who is
not admin gets 403 whatever the method or the image; then the method (405
with ``Allow``), then the image id (400) and the image itself (404/400).
The admin check and the method dispatch are ``auth.admin_only``; statuses
come from the errors raised here, through ``app.STATUS``.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from imagecache.cluster import delete_everywhere
from imagecache.errors import (
    BadRequest,
    NeedsClusterMode,
    NotInClusterMode,
    ResourceNotFound,
    UpstreamNotActive,
    UpstreamNotFound,
)
from imagecache.layout import ImageId
from imagecache.prefetch import queued_details
from imagecache.server.auth import Handler, admin_only, caller_from
from imagecache.server.queue_worker import QueueWorker
from imagecache.server.state import ServiceState
from imagecache.upstreams.base import SERVICE

WORKER = web.AppKey("queue_worker", QueueWorker)
CLEAR_TARGET = "x-image-cache-clear-target"
# GET /v2/cache?details=true adds "queued_details"; no Glance client sends it.
DETAILS = "details"


# --- /v2/cache --------------------------------------------------------------------------------


async def get_cache(request: web.Request, state: ServiceState) -> web.StreamResponse:
    all_nodes = _flag(request, "all_nodes")
    driver = state.cache.central
    if all_nodes and driver is None:
        raise NeedsClusterMode(NotInClusterMode("listing every node's cache (all_nodes=true)"))
    details = _flag(request, DETAILS)
    cached, queued = await state.fills.run(_listing, state)
    # Exactly Glance's document unless asked for more: glanceclient's
    # cache-list takes every key but "cached_images" for a list of queued ids,
    # so a third key showed each queued image twice.
    body: dict[str, object] = {"cached_images": cached, "queued_images": queued}
    if details:
        # When each was queued and why its last prefetch failed.
        queued_info = await state.fills.run(queued_details, state.cache)
        body["queued_details"] = [entry.as_dict() for entry in queued_info]
    if all_nodes and driver is not None:
        listing = await state.fills.run(driver.cluster_listing)
        body["cluster"] = {entry.node.url: entry.as_dict() for entry in listing}
    return web.json_response(body)


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter (absent is false); 400 for a value that is not one."""
    raw = request.query.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise BadRequest(f"{name} must be true or false, not {raw!r}")


def _listing(state: ServiceState) -> tuple[list[dict[str, object]], list[str]]:
    cached = [image.as_dict() for image in state.cache.get_cached_images()]
    return cached, state.cache.get_queued_images()


async def clear_cache(request: web.Request, state: ServiceState) -> web.StreamResponse:
    target = request.headers.get(CLEAR_TARGET, "").strip().lower()
    if target not in ("", "cache", "queue"):
        raise BadRequest(f"{CLEAR_TARGET} must be 'cache', 'queue' or empty, not {target!r}")
    if target in ("", "cache"):
        await state.fills.run(state.cache.delete_all_cached_images)
    if target in ("", "queue"):
        await state.fills.run(state.cache.delete_all_queued_images)
    return web.Response(status=204)


async def queue_image(request: web.Request, state: ServiceState) -> web.StreamResponse:
    image_id = state.image_id(request)
    caller = caller_from(request.headers)
    try:
        await state.upstream.info(image_id, caller)  # UpstreamNotFound: 404 with its message
    except UpstreamNotActive as exc:
        raise BadRequest(f"only active images can be queued; {image_id} is {exc.status}") from exc
    await state.fills.run(state.cache.queue_image, image_id)
    # The fetch runs later, when the caller's token may have expired: the cache's
    # own account fetches it where there is one, else the caller's identity.
    request.app[WORKER].submit(image_id, SERVICE if state.identity is not None else caller)
    return web.Response(status=202)


async def delete_entry(request: web.Request, state: ServiceState) -> web.StreamResponse:
    image_id = state.image_id(request)
    known = await state.fills.run(_forget, state, image_id)
    if not known:
        # Glance answers 404 only for an image that neither exists nor is cached or queued.
        try:
            await state.upstream.info(image_id, caller_from(request.headers))
        except UpstreamNotFound as exc:
            raise ResourceNotFound(f"image {image_id} is not cached, queued or known") from exc
        except UpstreamNotActive:
            pass  # it exists; there was simply nothing here to delete
    return web.Response(status=204)


def _forget(state: ServiceState, image_id: ImageId) -> bool:
    # In cluster mode the copies on every other node go too (server/cluster.py's ClusterTasks).
    cached = delete_everywhere(state.cache, image_id)
    queued = state.cache.delete_queued_image(image_id)
    return cached or queued


async def cached_nodes(request: web.Request, state: ServiceState) -> web.StreamResponse:
    """The holders' URLs (Glance's list); ``?details=true``: ``[{"url", "site"}]`` each."""
    image_id = state.image_id(request)
    details = _flag(request, DETAILS)
    driver = state.cache.central
    try:
        if details and driver is not None:
            siblings = await state.fills.run(driver.get_cached_siblings, image_id)
            return web.json_response([{"url": s.url, "site": s.site} for s in siblings])
        nodes = await state.fills.run(state.cache.get_cached_nodes, image_id)
    except NotInClusterMode as exc:
        raise NeedsClusterMode(exc) from exc
    return web.json_response(nodes)


async def clean(request: web.Request, state: ServiceState) -> web.StreamResponse:
    await state.fills.run(state.cache.clean)
    return web.Response(status=200)


async def prune(request: web.Request, state: ServiceState) -> web.StreamResponse:
    result = await state.fills.run(state.cache.prune)
    return web.json_response(
        {"total_files_pruned": result.files, "total_bytes_pruned": result.bytes}
    )


# --- legacy cachemanage routes (glance-cache-manage) ------------------------------------------


async def legacy_cached(request: web.Request, state: ServiceState) -> web.StreamResponse:
    cached, _ = await state.fills.run(_listing, state)
    return web.json_response({"cached_images": cached})


async def legacy_queued(request: web.Request, state: ServiceState) -> web.StreamResponse:
    return web.json_response(
        {"queued_images": await state.fills.run(state.cache.get_queued_images)}
    )


async def legacy_delete_all_cached(request: web.Request, state: ServiceState) -> web.StreamResponse:
    count = await state.fills.run(state.cache.delete_all_cached_images)
    return web.json_response({"num_deleted": count})


async def legacy_delete_all_queued(request: web.Request, state: ServiceState) -> web.StreamResponse:
    count = await state.fills.run(state.cache.delete_all_queued_images)
    return web.json_response({"num_deleted": count})


async def legacy_delete_cached(request: web.Request, state: ServiceState) -> web.StreamResponse:
    await state.fills.run(_delete_here, state, state.image_id(request))
    return web.json_response(None)


def _delete_here(state: ServiceState, image_id: ImageId) -> None:
    state.cache.cancel_fill(image_id)  # the deletion wins over a fill in progress
    state.cache.delete_cached_image(image_id)


async def legacy_queue(request: web.Request, state: ServiceState) -> web.StreamResponse:
    # Glance's legacy route only writes the marker; a prefetch run fetches it later.
    await state.fills.run(state.cache.queue_image, state.image_id(request))
    return web.json_response(None)


async def legacy_delete_queued(request: web.Request, state: ServiceState) -> web.StreamResponse:
    await state.fills.run(state.cache.delete_queued_image, state.image_id(request))
    return web.json_response(None)


def add_routes(app: web.Application) -> None:
    """Register the management routes; static paths before ``{image_id}`` ones.

    An id matches any non-empty segment (aiohttp's default refuses ``{`` and
    ``}``), so every odd id reaches the one validation and gets its 400.
    """
    table: list[tuple[str, dict[str, Handler]]] = [
        ("/v2/cache", {"GET": get_cache, "DELETE": clear_cache}),
        ("/v2/cache/clean", {"POST": clean}),
        ("/v2/cache/prune", {"POST": prune}),
        ("/v2/cache/nodes/{image_id:[^/]+}", {"GET": cached_nodes}),
        ("/v2/cache/{image_id:[^/]+}", {"PUT": queue_image, "DELETE": delete_entry}),
        ("/v2/cached_images", {"GET": legacy_cached, "DELETE": legacy_delete_all_cached}),
        ("/v2/cached_images/{image_id:[^/]+}", {"DELETE": legacy_delete_cached}),
        ("/v2/queued_images", {"GET": legacy_queued, "DELETE": legacy_delete_all_queued}),
        (
            "/v2/queued_images/{image_id:[^/]+}",
            {"PUT": legacy_queue, "DELETE": legacy_delete_queued},
        ),
    ]
    for path, methods in table:
        app.router.add_route(hdrs.METH_ANY, path, admin_only(methods))
