"""The HTTP plumbing the http and glance upstreams share: one session, redirects, bodies.

``HttpClient.fetch`` is every request of those upstreams (metadata, ranges,
access checks), ``HttpClient.stream`` a body read on the event loop and
``HttpClient.open_get`` one for the fill pump (``http_source``); both bodies
resume across broken connections (``resume``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp

from imagecache.errors import UpstreamError
from imagecache.upstreams.base import BlockingSource, describe_failure
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.http_source import (
    MAX_REDIRECTS,
    REDIRECTS,
    HttpSource,
    check_status,
    open_get,
    redirected,
)
from imagecache.upstreams.resume import (
    Reply,
    ResumePolicy,
    Validator,
    resumable_stream,
)
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents
from imagecache.upstreams.resume_source import ResumingSource


class HttpClient:
    """One aiohttp session per upstream, created in the running loop on first use.

    The session is made lazily because an upstream is often built before the
    event loop runs (by the CLI), and an aiohttp session belongs to one loop.
    """

    def __init__(
        self, config: UpstreamConfig, resume_events: ResumeEvents = NO_RESUME_EVENTS
    ) -> None:
        self._timeout = config.upstream_timeout
        self._resume = ResumePolicy.of(config, resume_events)
        self._session: aiohttp.ClientSession | None = None

    @property
    def timeout(self) -> float:
        """The upstream timeout: for connecting and for each read."""
        return self._timeout

    async def open_get(self, url: str, headers: Mapping[str, str], image_id: str) -> HttpSource:
        """A whole body for the fill pump (``http_source``), the GET sent off the loop."""
        return await asyncio.to_thread(open_get, url, headers, self._timeout, image_id)

    def resuming(
        self, source: HttpSource, url: str, headers: Mapping[str, str], image_id: str
    ) -> BlockingSource:
        """``source`` (from ``open_get``), resumed across broken connections (resume.py)."""

        def reopen(offset: int, validator: Validator) -> tuple[int, Mapping[str, str], HttpSource]:
            sent = {**headers, **validator.http_headers(offset)}
            again = open_get(url, sent, self._timeout, image_id, check=False)
            return again.status, again.headers, again

        return ResumingSource.wrap(
            image_id, self._resume, source, source.status, source.headers, reopen
        )

    async def stream(
        self,
        url: str,
        headers: Mapping[str, str],
        image_id: str,
        span: tuple[int, int | None],
        what: tuple[str, str],
        first: Callable[[str, int], None] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """Bytes ``span`` of the body of a GET of ``url``, resumed across breaks (resume.py).

        ``what``: how errors name the request and its status ("upstream GET",
        "GET"); ``first`` checks the first answer's status further.
        """
        start, end = span

        @contextlib.asynccontextmanager
        async def open_part(offset: int, validator: Validator | None) -> AsyncIterator[Reply]:
            ranged = (
                range_header(offset, end) if validator is None else validator.http_headers(offset)
            )
            async with contextlib.AsyncExitStack() as stack:
                try:
                    response = await stack.enter_async_context(
                        self.fetch("GET", url, {**headers, **ranged})
                    )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise UpstreamError(
                        f"image {image_id!r}: {what[0]} failed: {describe_failure(exc)}"
                    ) from exc
                if validator is None:
                    raise_for_status(response, image_id, what[1])
                    if first is not None:
                        first(image_id, response.status)
                body = read_body(response, image_id, offset, end, bool(ranged))
                async with contextlib.aclosing(body):
                    yield Reply(response.status, response.headers, body)

        async for chunk in resumable_stream(image_id, self._resume, open_part, start, end):
            yield chunk

    @contextlib.asynccontextmanager
    async def fetch(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        *,
        short: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One ``GET`` or ``HEAD`` of an upstream, following redirects as the fill pump does.

        Every request of an upstream goes through here, so all of them follow
        the same redirects: aiohttp follows none for HEAD, and a redirecting
        origin's ``Content-Length: 0`` was once taken for the image's size.
        At most ``MAX_REDIRECTS`` hops; the caller's identity headers are not
        sent to another origin than the one configured (``open_get`` does the
        same). ``short``: a metadata call, the whole exchange within the
        upstream timeout (``short_timeout``). aiohttp's errors are the
        caller's to translate.
        """
        origin = urlsplit(url)[:2]
        sent = dict(headers)
        session = self.session()
        for _ in range(MAX_REDIRECTS + 1):
            if short:
                response = await session.request(
                    method, url, headers=sent, allow_redirects=False, timeout=self.short_timeout
                )
            else:
                response = await session.request(method, url, headers=sent, allow_redirects=False)
            location = response.headers.get("Location")
            if response.status in REDIRECTS and location:
                response.release()
                url, sent = redirected(url, location, origin, sent)
                continue
            try:
                yield response
            finally:
                response.release()
            return
        raise UpstreamError(f"{method} {url}: more than {MAX_REDIRECTS} redirects upstream")

    async def reachable(self, url: str, what: str) -> str:
        """HEAD ``url``; any answer below 500 means the origin is up (raises UpstreamError)."""
        try:
            async with self.fetch("HEAD", url, {}, short=True) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = describe_failure(exc)
            raise UpstreamError(f"the {what} at {url} does not answer: {detail}") from exc
        if status >= 500:
            raise UpstreamError(f"the {what} at {url} answers HTTP {status}")
        return f"the {what} at {url} answers (HTTP {status})"

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No total timeout: a multi-GB body may take minutes. Connecting and
            # each read are bounded instead, so a stalled origin still fails.
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self._timeout, sock_read=self._timeout
            )
            # auto_decompress off: we cache the origin's bytes exactly, and a
            # Content-Length only describes them if nothing re-encodes them.
            self._session = aiohttp.ClientSession(
                timeout=timeout, auto_decompress=False, raise_for_status=False
            )
        return self._session

    @property
    def short_timeout(self) -> aiohttp.ClientTimeout:
        """For metadata calls, whose whole exchange must fit the upstream timeout."""
        return aiohttp.ClientTimeout(total=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def raise_for_status(response: aiohttp.ClientResponse, image_id: str, what: str) -> None:
    """Translate an origin's error status into our exception tree."""
    check_status(response.status, image_id, what)


def range_header(start: int, end: int | None) -> dict[str, str]:
    """The ``Range`` header for ``[start, end)``; empty for the whole body."""
    if start == 0 and end is None:
        return {}
    last = "" if end is None else str(end - 1)
    return {"Range": f"bytes={start}-{last}"}


async def read_body(
    response: aiohttp.ClientResponse,
    image_id: str,
    start: int,
    end: int | None,
    ranged: bool,
) -> AsyncGenerator[bytes, None]:
    """Yield the body of ``response`` as bytes ``[start, end)`` of the image.

    ``ranged`` says a Range was asked for. An origin may ignore it and answer
    200 with the whole image; then the unwanted bytes are skipped here, which
    is slower but correct. A body shorter than its Content-Length, a reset or
    a read timeout raises ``UpstreamError``: a quiet short stream would be
    cached as a truncated image.
    """
    whole = response.status == 200
    skip = start if ranged and whole else 0
    limit = None if end is None else end - start
    expected = response.content_length
    received = 0
    sent = 0
    try:
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk = chunk[skip:]
                skip = 0
            if limit is not None and sent + len(chunk) >= limit:
                chunk = chunk[: limit - sent]
                sent += len(chunk)
                if chunk:
                    yield chunk
                return
            sent += len(chunk)
            yield chunk
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
        raise UpstreamError(
            f"image {image_id!r}: upstream body failed after {received} bytes: "
            f"{describe_failure(exc)}"
        ) from exc
    if expected is not None and received != expected:
        raise UpstreamError(
            f"image {image_id!r}: upstream body ended after {received} of {expected} bytes"
        )
