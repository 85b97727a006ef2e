"""The connections of one worker: header and idle timeouts, a bound, quiet exhaustion.

aiohttp on its own holds a connection that never completes a request header
for as long as its keep-alive timeout (3,630 s by default), and accepts every
connection the kernel hands it. 300 slowloris connections (a header byte every
few seconds) then held a worker's descriptors, and at the descriptor limit
every request answered 500 while asyncio logged each failed ``accept`` with a
traceback (64 MB of log in 30 s). Here, per worker:

- ``header_timeout``: a connection must deliver a complete request header
  within that many seconds of opening, or of the first byte of a later
  request, else it is closed. Only while no request is being handled: a
  request body (an image upload relayed to Glance) is not a header.
- ``keepalive_timeout``: an idle keep-alive connection is closed after that
  many seconds (aiohttp's own timer, set from the setting).
- ``max_connections``: beyond it a new connection is answered at once with a
  ``503`` (``Connection: close``, ``Retry-After``) and closed. A status rather
  than a silent close at accept: clients (glanceclient, curl --retry, a
  cascade) treat a 503 as "busy, retry" and show its text, where a reset looks
  like a network fault. The answer is written before the request is read, then
  the connection lingers (reading and dropping) for up to ``REFUSAL_LINGER``
  seconds so the kernel does not reset it under the client's feet; at most
  ``MAX_LINGERING`` refusals linger at once, further ones are closed at once.
- refusals and accept errors of resource exhaustion (EMFILE, ENFILE, ...)
  are logged at most once per ``LOG_INTERVAL`` seconds, with a count.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from imagecache.server.state import STATE
from imagecache.settings import Settings

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
REFUSAL_LINGER = 2.0
MAX_LINGERING = 64
# Descriptors a worker needs besides its connections: sqlite (two per disk
# thread), the listening socket, logs, the ledger, upstream connections.
DESCRIPTOR_RESERVE = 128

_REFUSAL_TEXT = b"503 Service Unavailable: this worker serves its max_connections; retry.\n"
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: " + str(len(_REFUSAL_TEXT)).encode() + b"\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _REFUSAL_TEXT
)


class RateLimitedLog:
    """A warning at most once per ``interval`` seconds, saying how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -interval
        self._held_back = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held_back += 1
            return
        held_back, self._held_back = self._held_back, 0
        self._last = now
        if held_back:
            message += f" ({held_back} more like it in the last {self.interval:g} s)"
        self.logger.warning(message, *args)


def effective_max_connections(settings: Settings) -> int:
    """``max_connections``, lowered to what the descriptor limit can carry.

    A connection may hold two descriptors (its socket and a cached file being
    sent); a bound the limit cannot carry would turn into EMFILE, and 500s, first.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    carried = max(1, (soft - DESCRIPTOR_RESERVE) // 2)
    if carried < settings.max_connections:
        log.warning(
            "max_connections %d lowered to %d: the open-file limit (RLIMIT_NOFILE) is %d",
            settings.max_connections,
            carried,
            soft,
        )
        return carried
    return settings.max_connections


def raise_open_file_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (inherited by forked workers); log both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.info("open-file limit (RLIMIT_NOFILE) is %s, the hard limit", soft)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %s to %s: %s", soft, hard, exc)
        return
    log.info("raised the open-file limit (RLIMIT_NOFILE) from %s to %s", soft, hard)


class _GuardedHandler(RequestHandler):
    """aiohttp's protocol with a deadline for each request header.

    It reads two attributes of aiohttp's RequestHandler (3.x): ``_waiter``, set
    while it waits for the next message, and ``_request_count``, raised by each
    parsed message; tests/server/test_server_connections.py fails if they change.
    """

    def __init__(self, site: GuardedSite, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._site = site
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._site.open_connections += 1
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._site.open_connections -= 1
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Between requests (start() waits for a message) the first byte of the
        # next one starts its header's clock; during a request, bytes are its body.
        waiting = self._waiter is not None and not self._waiter.done()
        if self._header_deadline is None and waiting:
            self._arm_header_timer()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_deadline = self._loop.call_later(
            self._site.settings.header_timeout, self._header_expired
        )

    def _disarm_header_timer(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_expired(self) -> None:
        self._header_deadline = None
        if self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            log.info(
                "closing a connection from %s: no complete request header within %g s",
                peer,
                self._site.settings.header_timeout,
            )
            self.force_close()


class _Refusal(asyncio.Protocol):
    """Answers 503 at once, drops what the client sends, closes within REFUSAL_LINGER s."""

    def __init__(self, site: GuardedSite) -> None:
        self._site = site
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(REFUSAL)
        if self._site.lingering >= MAX_LINGERING:
            transport.close()  # flushes the answer, then closes
            return
        self._site.lingering += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, transport.close)
        if transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        pass  # the request we already answered

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._site.lingering -= 1


class GuardedSite(web.BaseSite):
    """A site on an already listening socket whose connections follow the settings above."""

    def __init__(
        self, runner: web.AppRunner, sock: socket.socket, settings: Settings, **handler: Any
    ) -> None:
        super().__init__(runner)
        self.app = runner.app
        self.sock = sock
        self.settings = settings
        self.max_connections = effective_max_connections(settings)
        self.open_connections = 0
        self.lingering = 0
        self.refused = 0
        self._handler_kwargs = handler
        self._refusals = RateLimitedLog(log)
        self._previous_handler: _Handler = None

    @property
    def name(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        if STATE in self.app:
            self.app[STATE].metrics.registry.register(_ConnectionsCollector(self))
        loop = asyncio.get_running_loop()
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(_quiet_exhaustion(self._previous_handler))
        self._server = await loop.create_server(self._protocol, sock=self.sock, backlog=1024)

    async def stop(self) -> None:
        await super().stop()
        asyncio.get_running_loop().set_exception_handler(self._previous_handler)

    def _protocol(self) -> asyncio.Protocol:
        if self.open_connections >= self.max_connections:
            self.refused += 1
            self._refusals.warning(
                "refusing connections with 503: %d open, max_connections is %d",
                self.open_connections,
                self.max_connections,
            )
            return _Refusal(self)
        server = self._runner.server
        assert server is not None, "the runner is set up before its site starts"
        loop = asyncio.get_running_loop()
        return _GuardedHandler(self, manager=server, loop=loop, **self._handler_kwargs)


class _ConnectionsCollector(Collector):
    """The site's numbers when scraped (in-memory counters, nothing to wait for)."""

    def __init__(self, site: GuardedSite) -> None:
        self.site = site

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "imagecache_connections_open", "Client connections open", self.site.open_connections
        )
        yield CounterMetricFamily(
            "imagecache_connections_refused",
            "Connections answered 503 because max_connections were open",
            self.site.refused,
        )


_Handler = Any  # asyncio's exception-handler type is not public


def _quiet_exhaustion(previous: _Handler) -> _Handler:
    """An exception handler that rate-limits asyncio's "out of system resource" on accept.

    asyncio logs every failed ``accept()`` (EMFILE, ENFILE, ENOBUFS, ENOMEM) with
    a traceback, up to a backlog's worth per wake-up; under descriptor exhaustion
    that was most of the 64 MB of log. Everything else goes where it went.
    """
    limited = RateLimitedLog(log)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == "socket.accept() out of system resource":
            limited.warning(
                "cannot accept connections: %s; open-file limit (RLIMIT_NOFILE) %s",
                context.get("exception"),
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle


async def start_site(
    app: web.Application, settings: Settings, sock: socket.socket, **handler: Any
) -> tuple[web.AppRunner, GuardedSite]:
    """Set up ``app`` and serve it on ``sock``; ``handler`` goes to aiohttp's RequestHandler.

    ``handler`` may carry ``shutdown_timeout`` (for the runner) and the access
    log arguments. Stop with ``runner.cleanup()``.
    """
    shutdown_timeout = handler.pop("shutdown_timeout", 60.0)
    handler["keepalive_timeout"] = settings.keepalive_timeout
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, **handler)
    await runner.setup()
    site = GuardedSite(runner, sock, settings, **handler)
    await site.start()
    return runner, site
