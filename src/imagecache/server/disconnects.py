"""A client that leaves before its response is complete: one quiet line, no traceback.

Clients leave all the time (a download manager closing its extra
connections, a user pressing Ctrl-C, a cascade's follower giving up). The
write that finds the socket gone raises ``ConnectionResetError`` or
``BrokenPipeError`` (from ``os.sendfile``) or aiohttp's
``ClientConnectionResetError``; left to aiohttp, each became an ERROR with a
~60-line traceback ("Error handling request"), 22 of them per cold
``aria2c -x16`` run. Here such an error, when the connection is indeed
closing, ends the request with one INFO line. A ``ConnectionError`` while the
client's connection is still open (an origin resetting, say) is not the
client's leaving and goes on as before.

The handler's prepared response is handed back to aiohttp (it is recorded when
prepared, through ``on_response_prepare``), so the access log still sees
the real status and headers, and aiohttp's own finishing step notices the
closed transport and drops the connection quietly.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

log = logging.getLogger(__name__)

_PREPARED = web.RequestKey("prepared_response", web.StreamResponse)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def install(app: web.Application) -> None:
    """Add the middleware (innermost so far) and the signal that records responses."""
    app.middlewares.append(_client_gone)
    app.on_response_prepare.append(_remember)


async def _remember(request: web.Request, response: web.StreamResponse) -> None:
    request[_PREPARED] = response


def _left(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def _client_gone(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConnectionError as exc:
        if not _left(request):
            raise
        log.info(
            "client %s left before the response to %s %r was complete (%s)",
            request.remote,
            request.method,
            request.path,
            type(exc).__name__,
        )
        prepared = request.get(_PREPARED)
        # A response never prepared gets a stand-in: aiohttp needs one to finish.
        return prepared if prepared is not None else web.Response(status=499)
