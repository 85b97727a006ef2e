"""The aiohttp application of one service process: routes, middlewares, start and stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger

from imagecache.cache import ImageCache
from imagecache.capacity import Capacity
from imagecache.errors import (
    AccessUnconfirmed,
    AuthorisationUnavailable,
    BadRequest,
    CacheUnavailable,
    ConfigurationError,
    IdentityError,
    ImageCacheError,
    InvalidImageId,
    MethodNotAllowed,
    NeedsClusterMode,
    NotPermitted,
    PreheatJobFinished,
    RangeNotSatisfiable,
    ResourceNotFound,
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotActive,
    UpstreamNotFound,
    VerificationError,
    is_origin_failure,
)
from imagecache.fill import fill_config
from imagecache.fill.coordinator import FillCoordinator
from imagecache.fill.hooks import NO_HOOKS, FillHooks
from imagecache.keystone import TokenValidator
from imagecache.metadata import metadata_for
from imagecache.prefetch import Prefetcher
from imagecache.server import (
    background,
    cache_api,
    cluster,
    disconnects,
    images,
    operations,
    preheat,
    proxy,
    readiness,
    schemas,
)
from imagecache.server.auth import AccessCache
from imagecache.server.delivery import delivery_of, on_prepare, track, write_access_line
from imagecache.server.metrics import Metrics
from imagecache.server.queue_worker import QueueWorker
from imagecache.server.state import STATE, ServiceState
from imagecache.settings import Settings
from imagecache.upstreams import open_upstream, service_identity, upstream_config
from imagecache.upstreams.base import Upstream

log = logging.getLogger(__name__)

# The metrics publisher and the Keystone role check, cancelled on cleanup.
_TASKS = web.AppKey("background_tasks", list[asyncio.Task[None]])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def shutdown_grace(settings: Settings) -> float:
    """How long a stopping process lets running fills and downloads finish.

    As long as one upstream read may take: a fill that gets no byte for that
    long would fail anyway, and one that is moving usually finishes.
    """
    return settings.upstream_timeout


# The HTTP status of each error the library and the handlers raise on purpose:
# the one place errors become statuses. Looked up along the class's MRO, so
# the most specific entry wins (AccessUnconfirmed is an UpstreamError but 503);
# an ImageCacheError with no entry on its way up is a 500.
STATUS: dict[type[ImageCacheError], int] = {
    BadRequest: 400,  # MalformedRange too
    InvalidImageId: 400,
    UpstreamNotActive: 400,  # Glance's answer for an image with no data
    NotPermitted: 403,
    UpstreamForbidden: 403,  # or 401 when the origin said 401 (error_status)
    ResourceNotFound: 404,
    UpstreamNotFound: 404,
    MethodNotAllowed: 405,
    NeedsClusterMode: 409,
    PreheatJobFinished: 409,
    RangeNotSatisfiable: 416,
    VerificationError: 502,
    UpstreamError: 502,
    AccessUnconfirmed: 503,
    AuthorisationUnavailable: 503,
    CacheUnavailable: 503,
}


def error_status(exc: ImageCacheError) -> int:
    """The HTTP status of an error the library or a handler raised on purpose (``STATUS``)."""
    if isinstance(exc, UpstreamForbidden) and exc.status == 401:
        return 401
    for cls in type(exc).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_headers(exc: ImageCacheError) -> dict[str, str]:
    """Headers an error answer carries besides the body: what the caller needs to retry right."""
    match exc:
        case MethodNotAllowed(allowed=allowed):
            return {hdrs.ALLOW: ",".join(allowed)}
        case RangeNotSatisfiable(size=size):
            return {hdrs.CONTENT_RANGE: f"bytes */{size}"}
    return {}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate errors to statuses, and every error answer to Glance's body, here only.

    Handlers raise ``imagecache.errors`` classes (``RequestError`` for answers
    like 400/403/404/405/409/416); aiohttp's own ``web.HTTP*`` reach here only
    from aiohttp itself (no route, a body over ``client_max_size``).
    """
    try:
        return await handler(request)
    except ImageCacheError as exc:
        status = error_status(exc)
        if is_origin_failure(exc):
            request.app[STATE].metrics.upstream_errors.inc()
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        delivery = delivery_of(request)
        if delivery is not None and delivery.status is not None:
            # Headers (and maybe bytes) are out: a second response would be
            # written into the first one's body. Let the connection be cut.
            raise
        return glance_error(request, status, str(exc), error_headers(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return glance_error(request, exc.status, _message_of(exc), exc.headers)


def _message_of(exc: web.HTTPException) -> str:
    text = exc.text or ""
    # aiohttp's own answers (no route, wrong method) say only "404: Not Found".
    if text in ("", f"{exc.status}: {exc.reason}"):
        return _DEFAULT_EXPLANATION.get(exc.status, exc.reason)
    return text


# webob's explanations, which Glance sends for errors that have no message of their own.
_DEFAULT_EXPLANATION = {
    404: "The resource could not be found.",
    405: "The method is not allowed for this resource.",
}


def glance_error(
    request: web.BaseRequest,
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An error answer shaped as Glance (webob) shapes it, so clients show ``message``.

    HTML by default, JSON ``{"message", "code", "title"}`` to a caller that
    prefers JSON, as webob chooses. python-glanceclient and openstacksdk take
    the text of the HTML body (tags stripped) or the JSON ``message`` as the
    exception's details; a plain-text body left the SDK with the reason only.
    """
    reason = HTTPStatus(status).phrase if status in _KNOWN_STATUSES else "Error"
    kept = {
        name: value
        for name, value in (headers or {}).items()
        if name.lower() not in ("content-type", "content-length")
    }
    accept = request.headers.get(hdrs.ACCEPT, "")
    if "application/json" in accept and "text/html" not in accept:
        return web.json_response(
            {"message": message, "code": f"{status} {reason}", "title": reason},
            status=status,
            headers=kept,
        )
    shown = html.escape(message, quote=False)
    body = (
        f"<html>\n <head>\n  <title>{status} {reason}</title>\n </head>\n <body>\n"
        f"  <h1>{status} {reason}</h1>\n  {shown}<br /><br />\n\n\n\n </body>\n</html>"
    )
    return web.Response(status=status, text=body, content_type="text/html", headers=kept)


_KNOWN_STATUSES = {member.value for member in HTTPStatus}


class AccessLogger(AbstractAccessLogger):
    """One line per request, after its response is sent. Headers are never logged: tokens.

    The format (docs/service.md, "The access log")::

        remote=ADDR method=M path=PATH status=S bytes=SENT completed=yes|no
        request_id=req-UUID duration=SECONDS cache="CACHE-STATUS"|-

    Written by ``delivery.write_access_line``, which also writes it for a
    response that broke after it started (aiohttp logs no access line then).
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        write_access_line(self.logger, request, response.status, time)


async def healthcheck(request: web.Request) -> web.StreamResponse:
    return web.Response(text="OK")


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return web.Response(
        body=state.metrics.render(), headers={"Content-Type": state.metrics.content_type}
    )


def create_app(
    settings: Settings,
    *,
    upstream: Upstream | None = None,
    cache: ImageCache | None = None,
    metrics_dir: Path | None = None,
    fill_hooks: FillHooks = NO_HOOKS,
) -> web.Application:
    """The service over ``settings``; ``upstream``/``cache`` default to what the settings name.

    ``metrics_dir`` is given to every worker of a pre-forked service, so that
    ``/metrics`` shows all of them whichever one is scraped. ``fill_hooks``:
    where tests hold or watch the fills (fill/hooks.py).
    """
    identity = service_identity(settings)
    tokens = None
    if settings.keystone is not None and identity is not None:
        tokens = TokenValidator(
            identity,
            settings.keystone.token_cache_ttl,
            max_entries=settings.keystone.token_cache_size,
        )
    metrics_ = Metrics(metrics_dir)
    origin_config = upstream_config(settings)
    if upstream is None:
        if settings.upstream is None:
            raise ConfigurationError("upstream: the service needs one, e.g. directory:/srv/images")
        # An upstream passed in was built without the metrics: its resumes count nowhere.
        upstream = open_upstream(settings.upstream, origin_config, identity, resume_events=metrics_)
    if cache is None:
        cache = ImageCache(settings)
    app = web.Application(middlewares=[track, _errors], client_max_size=1024**2)
    app.on_response_prepare.append(on_prepare)
    disconnects.install(app)  # innermost: a client that left is one INFO line
    background.install(app)  # before anything adds work to it (cluster, operations)
    app[_TASKS] = []
    # Fills ask live siblings before the origin in cluster mode; everything else
    # (proxying, access checks, ranges) talks to the origin itself.
    fill_source = cluster.enable(app, settings, cache, upstream, origin_config, metrics_)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=16, thread_name_prefix="imagecache-disk"
    )
    ttl, timeout = settings.metadata_cache_ttl, settings.upstream_timeout
    metadata = metadata_for(cache.layout.lock_dir, upstream, ttl, timeout, executor)
    capacity = Capacity(cache)
    fills = FillCoordinator(
        fill_config(settings),
        cache,
        fill_source,
        metrics_,
        executor,
        fill_hooks,
        capacity=capacity,
        metadata=metadata,
    )
    prefetcher = Prefetcher(  # the queue worker's, maintenance's and preheat's
        cache,
        upstream,
        fills=fills,
        executor=executor,
        metadata=metadata,
        concurrency=settings.prefetch_concurrency,
        retries=settings.prefetch_retries,
    )
    app[STATE] = ServiceState(
        settings=settings,
        cache=cache,
        upstream=upstream,
        metrics=metrics_,
        fills=fills,
        access=AccessCache(upstream, settings.auth_cache_ttl, offline_grace=settings.offline_grace),
        metadata=metadata,
        executor=executor,
        identity=identity,
        tokens=tokens,
    )
    app[cache_api.WORKER] = QueueWorker(fills, settings.prefetch_concurrency, metadata, prefetcher)

    app.router.add_get("/healthcheck", healthcheck)
    app.router.add_get("/healthcheck/ready", readiness.ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("GET", "/v2/images/{image_id:[^/]+}/file", images.image_file)
    app.router.add_route("HEAD", "/v2/images/{image_id:[^/]+}/file", images.image_file)
    # Size limit, prefetch retries, maintenance and their routes (before /v2/cache/{id}).
    operations.install(app, capacity, prefetcher)
    preheat.install(app)  # its routes too, and it runs this node's items through the prefetcher
    cache_api.add_routes(app)
    app.router.add_get("/", proxy.versions)
    app.router.add_get("/versions", proxy.versions)
    app.router.add_get("/v2", proxy.v2_root)
    app.router.add_route("*", "/v2/images/{image_id:[^/]+}", proxy.relay)
    app.router.add_get("/v2/schemas/{name:.+}", schemas.schema)
    app.router.add_route("*", "/v2/{tail:.*}", proxy.relay)

    async def start_tasks() -> None:
        _start_tasks(app)

    background.add(app, start_tasks)
    app.on_startup.append(_start)
    app.on_shutdown.append(_stop_fills)
    app.on_cleanup.append(_close)
    return app


async def _start(app: web.Application) -> None:
    app[cache_api.WORKER].start()


def _start_tasks(app: web.Application) -> None:
    state = app[STATE]
    if state.identity is not None:
        app[_TASKS].append(asyncio.create_task(_check_service_roles(state)))
    if state.metrics.share_dir is not None:
        app[_TASKS].append(asyncio.create_task(state.metrics.publish_periodically()))


async def _stop_fills(app: web.Application) -> None:
    # Runs when the server stops accepting: fills get a grace period, then roll back.
    await app[cache_api.WORKER].stop()
    state = app[STATE]
    await state.fills.shutdown(shutdown_grace(state.settings))


async def _check_service_roles(state: ServiceState) -> None:
    """Warn at start-up when the cache's account cannot do what it will be asked to.

    Glance lets only ``admin`` download another project's private image, which
    queued fetches and prefetch of such images need. Keystone being away now
    is not fatal: the identity logs that itself and retries when first needed.
    """
    assert state.identity is not None
    try:
        roles = await asyncio.to_thread(state.identity.roles)
    except IdentityError:
        return
    if "admin" not in roles:
        log.warning(
            "the cache's Keystone account (%s) has roles %s but not admin: queued fetches and "
            "prefetch of other projects' private images will be refused by Glance "
            "(docs/openstack.md, 'The cache's own account')",
            state.identity.auth.setting,
            ",".join(sorted(roles)) or "none",
        )
    if not roles & {"admin", "service"}:
        log.warning(
            "the cache's Keystone account has neither the service nor the admin role: "
            "Keystone will refuse to validate callers' tokens, so management is refused"
        )


async def _close(app: web.Application) -> None:
    for task in app[_TASKS]:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    state = app[STATE]
    await state.fills.shutdown(0)
    await state.upstream.close()
    state.executor.shutdown(wait=True)
    state.cache.close()
