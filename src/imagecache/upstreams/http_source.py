"""A whole image fetched over HTTP with blocking calls: the fill pump's source for http and glance.

Why not aiohttp, the project's HTTP client everywhere else: a fill moves every
byte of an image, and on that path aiohttp cost more than the rest of the
fill's plumbing. Measured (docs/benchmarks-log.md, "Miss path work"): reading
512 MiB from nginx on loopback took 0.21 s of CPU through aiohttp's
``iter_any`` (about 2,000 pieces, each one a trip through the event loop and
then to the disk executor) and 0.085 s through ``http.client`` reading
straight into the fill's own 1 MiB buffers, in the thread that writes and
queues them for hashing. Metadata lookups, ranges, access checks and the
passthrough proxy stay on aiohttp.

Behaviour matches the aiohttp path: the socket timeout is the upstream
timeout for connecting and for each read, nothing is decompressed, a body
shorter than its ``Content-Length`` is an ``UpstreamError``. Redirects are
followed (at most ``MAX_REDIRECTS``); the caller's identity headers are not
sent to another origin than the one configured.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import ssl
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

from imagecache.errors import (
    UpstreamError,
    UpstreamForbidden,
    UpstreamNotFound,
    UpstreamUnreachable,
)
from imagecache.upstreams.base import IDENTITY_HEADERS, describe_failure

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_IDENTITY = frozenset(name.lower() for name in IDENTITY_HEADERS)
_Failures = (OSError, http.client.HTTPException)


def without_identity(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without the caller's identity: for a redirect to another origin."""
    return {k: v for k, v in headers.items() if k.lower() not in _IDENTITY}


def redirected(
    url: str, location: str, origin: tuple[str, str], sent: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """The next hop of a redirect to ``location``, and the headers to send there.

    The caller's identity goes to the configured ``origin`` (scheme, host)
    alone: a hop to another one is sent ``without_identity``.
    """
    url = urljoin(url, location)
    if urlsplit(url)[:2] != origin:
        sent = without_identity(sent)
    return url, sent


def check_status(status: int, image_id: str, what: str) -> None:
    """Translate an origin's error status into our exception tree."""
    if status < 400:
        return
    if status == 404:
        raise UpstreamNotFound(image_id)
    if status in (401, 403):
        raise UpstreamForbidden(image_id, status)
    if status >= 500:
        raise UpstreamUnreachable(f"{what} for image {image_id!r} failed upstream: HTTP {status}")
    raise UpstreamError(f"{what} for image {image_id!r} failed upstream: HTTP {status}")


class HttpSource:
    """The body of one GET, read into the caller's buffers (``BlockingSource``)."""

    def __init__(
        self,
        image_id: str,
        connection: http.client.HTTPConnection,
        response: http.client.HTTPResponse,
    ) -> None:
        self.image_id = image_id
        self.status = response.status
        # HTTPMessage is a case-insensitive mapping of str; typeshed types it as Message.
        self.headers: Mapping[str, str] = dict(response.headers.items())
        self._connection = connection
        self._response = response
        self.received = 0
        chunked = "chunked" in (response.getheader("Transfer-Encoding") or "").lower()
        length = response.getheader("Content-Length")
        # None: chunked, or no length (the body ends when the connection does).
        self._remaining = int(length) if length and length.isdigit() and not chunked else None
        self._chunked = chunked

    def readinto(self, buffer: memoryview, /) -> int:
        """Whatever one read of the socket brings (at most ``len(buffer)``), 0 at the end.

        One read, not a full buffer: readers of the fill see bytes as they
        arrive from a slow origin. ``HTTPResponse.readinto`` would block until
        the buffer is full, so a body with a Content-Length is read from the
        response's buffered socket file (``fp``) with ``readinto1``, counting
        the length here; a chunked one through ``read1``.
        """
        try:
            if self._chunked:
                data = self._response.read1(len(buffer))
                count = len(data)
                buffer[:count] = data
            elif self._remaining is None:
                count = self._file().readinto1(buffer)
            elif self._remaining == 0:
                count = 0
            else:
                count = self._file().readinto1(buffer[: self._remaining])
                if count == 0:
                    raise http.client.IncompleteRead(b"", self._remaining)
                self._remaining -= count
        except _Failures as exc:
            raise UpstreamError(
                f"image {self.image_id!r}: upstream body failed after {self.received} bytes:"
                f" {describe_failure(exc)}"
            ) from exc
        self.received += count
        return count

    def copy_into(self, fd: int, count: int, /) -> None:
        """No kernel copy from a socket: the bytes come through ``readinto``."""

    def _file(self) -> io.BufferedReader:
        fp = self._response.fp
        if fp is None:  # closed under us
            raise http.client.IncompleteRead(b"", self._remaining)
        return fp

    def interrupt(self) -> None:
        # shutdown() wakes a recv blocked in another thread; close() alone does
        # not, and the descriptor must stay ours until close().
        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # The response too: its socket file keeps the socket open after the
        # connection lets go of it (a "Connection: close" answer), until GC.
        self._response.close()
        self._connection.close()


def open_get(
    url: str, headers: Mapping[str, str], timeout: float, image_id: str, *, check: bool = True
) -> HttpSource:
    """GET ``url`` (blocking), following redirects; raise for an error status.

    The returned source holds the connection until ``close``. ``check=False``
    (a resume, whose answer ``resume.Validator`` judges): any status is returned.
    """
    origin = urlsplit(url)[:2]
    sent = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        connection, response = _get(url, sent, timeout, image_id)
        location = response.getheader("Location")
        if response.status in REDIRECTS and location:
            connection.close()
            url, sent = redirected(url, location, origin, sent)
            continue
        try:
            if check:
                check_status(response.status, image_id, "GET")
        except UpstreamError:
            connection.close()
            raise
        return HttpSource(image_id, connection, response)
    raise UpstreamError(f"image {image_id!r}: more than {MAX_REDIRECTS} redirects upstream")


def _get(
    url: str, headers: Mapping[str, str], timeout: float, image_id: str
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"image {image_id!r}: cannot fetch {url!r} (not an http(s) URL)")
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", target, headers=dict(headers))
        return connection, connection.getresponse()
    except _Failures as exc:
        connection.close()
        raise UpstreamError(
            f"image {image_id!r}: upstream GET failed: {describe_failure(exc)}"
        ) from exc
