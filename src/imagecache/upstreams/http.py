"""The ``http`` upstream: images behind a URL template, plus the HTTP plumbing shared with glance.

``http:https://origin.example/images/{image_id}`` fetches
``https://origin.example/images/<id>``. What the origin promises about the
bytes comes from a HEAD (a GET of the first byte when HEAD is refused):

- size: ``Content-Length`` (or the total of a ``Content-Range``);
- md5: ``Content-MD5`` (hex, as Glance sends it, or RFC 1864 base64) or
  ``x-image-meta-checksum``;
- sha256/sha512: ``Repr-Digest`` / ``Digest`` (RFC 9530 / RFC 3230), and, when
  ``http_checksum_sidecar`` is set, sidecar files ``<url>.sha512``,
  ``<url>.sha256``, ``<url>.md5`` (``sha256sum`` output format).

Every request (HEAD, the ranged GET that stands in for it, sidecars, GETs
of whole images and ranges) follows redirects the same way, through
``HttpClient.fetch`` or, for the fill pump, ``http_source.open_get``; the
glance upstream uses the same two.

``ETag`` is deliberately *not* read as an md5 even when it looks like one: a
32-hex ETag that is something else (a content hash of another kind, a
version id) would fail verification on every fill, aborting every download
of that image. Origins that want md5 verification send ``Content-MD5``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from imagecache.errors import ConfigurationError, UpstreamError
from imagecache.records import ImageInfo
from imagecache.settings import Settings
from imagecache.upstreams.base import (
    ANONYMOUS,
    BlockingSource,
    Caller,
    Upstream,
    describe_failure,
)
from imagecache.upstreams.http_source import (
    MAX_REDIRECTS,
    REDIRECTS,
    HttpSource,
    check_status,
    open_get,
    without_identity,
)

# Hex digest length per algorithm, to reject garbage before it becomes a promise.
_HEX_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}
# Sidecars are tried strongest first; the strongest one found is the multihash.
_SIDECARS = ("sha512", "sha256", "md5")
# RFC 9530 algorithm tokens we understand, mapped to Glance's os_hash_algo names.
_DIGEST_ALGOS = {"sha-512": "sha512", "sha-256": "sha256", "sha512": "sha512", "sha256": "sha256"}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_CONTENT_RANGE_TOTAL = re.compile(r"^bytes\s+(?:\d+-\d+|\*)/(\d+)$")


class HttpClient:
    """One aiohttp session per upstream, created in the running loop on first use.

    The session is made lazily because an upstream is often built before the
    event loop runs (by the CLI), and an aiohttp session belongs to one loop.
    """

    def __init__(self, settings: Settings) -> None:
        self._timeout = settings.upstream_timeout
        self._session: aiohttp.ClientSession | None = None

    @property
    def timeout(self) -> float:
        """The upstream timeout: for connecting and for each read."""
        return self._timeout

    async def open_get(self, url: str, headers: Mapping[str, str], image_id: str) -> HttpSource:
        """A whole body for the fill pump (``http_source``), the GET sent off the loop."""
        return await asyncio.to_thread(open_get, url, headers, self._timeout, image_id)

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
                url = urljoin(url, location)
                if urlsplit(url)[:2] != origin:
                    sent = without_identity(sent)
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


class HttpUpstream(Upstream):
    """Images fetched from a URL template containing ``{image_id}``."""

    kind = "http"

    def __init__(self, url_template: str, settings: Settings) -> None:
        if "{image_id}" not in url_template:
            raise ConfigurationError(
                f"http upstream URL {url_template!r} must contain '{{image_id}}', "
                "e.g. http:https://origin.example/images/{image_id}"
            )
        if not url_template.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"http upstream URL {url_template!r} must start with http:// or https://"
            )
        self.url_template = url_template
        self._sidecars = settings.http_checksum_sidecar
        self._client = HttpClient(settings)

    def url(self, image_id: str) -> str:
        # Ids are validated at the edge; quoting anyway keeps a URL a URL.
        return self.url_template.replace("{image_id}", quote(image_id, safe=""))

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        url = self.url(image_id)
        headers = await self._head(image_id, url)
        size = _size_from(headers)
        checksum = _md5_from(headers)
        algo, value = _digest_from(headers)
        if self._sidecars:
            found = await self._read_sidecars(url)
            checksum = checksum or found.get("md5")
            for name in _SIDECARS:
                if name != "md5" and name in found and algo is None:
                    algo, value = name, found[name]
        return ImageInfo(
            image_id=image_id, size=size, checksum=checksum, hash_algo=algo, hash_value=value
        )

    async def stream(
        self,
        image_id: str,
        caller: Caller = ANONYMOUS,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        if end is not None and end <= start:
            return
        ranged = range_header(start, end)
        headers = {"Accept-Encoding": "identity", **ranged}
        async with contextlib.AsyncExitStack() as stack:
            try:
                response = await stack.enter_async_context(
                    self._client.fetch("GET", self.url(image_id), headers)
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamError(
                    f"image {image_id!r}: upstream GET failed: {describe_failure(exc)}"
                ) from exc
            raise_for_status(response, image_id, "GET")
            async for chunk in read_body(response, image_id, start, end, bool(ranged)):
                yield chunk

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource:
        headers = {"Accept-Encoding": "identity"}
        return await self._client.open_get(self.url(image_id), headers, image_id)

    async def check_reachable(self) -> str:
        # The origin's root, not an image: any answer means it is up.
        parts = urlsplit(self.url_template)
        root = f"{parts.scheme}://{parts.netloc}/"
        return await self._client.reachable(root, "http origin")

    async def close(self) -> None:
        await self._client.close()

    async def _head(self, image_id: str, url: str) -> Mapping[str, str]:
        fetch = self._client.fetch
        plain = {"Accept-Encoding": "identity"}
        try:
            async with fetch("HEAD", url, plain, short=True) as response:
                if response.status not in (405, 501):
                    raise_for_status(response, image_id, "HEAD")
                    return response.headers
            # Some origins (Glance's file route among them) refuse HEAD; the
            # first byte's headers carry the same promises.
            ranged = {**plain, "Range": "bytes=0-0"}
            async with fetch("GET", url, ranged, short=True) as response:
                raise_for_status(response, image_id, "GET")
                return response.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(
                f"image {image_id!r}: upstream HEAD failed: {describe_failure(exc)}"
            ) from exc

    async def _read_sidecars(self, url: str) -> dict[str, str]:
        names = await asyncio.gather(*(self._sidecar(url, name) for name in _SIDECARS))
        return {name: value for name, value in zip(_SIDECARS, names, strict=True) if value}

    async def _sidecar(self, url: str, algo: str) -> str | None:
        """The digest in ``<url>.<algo>``, or None if there is no usable one."""
        try:
            async with self._client.fetch("GET", f"{url}.{algo}", {}, short=True) as response:
                if response.status != 200:
                    return None
                text = (await response.content.read(4096)).decode("ascii", "replace")
        except (aiohttp.ClientError, TimeoutError, UpstreamError):
            # A sidecar is an optional extra promise; without it we verify less.
            return None
        words = text.split()
        return _hex_digest(algo, words[0]) if words else None


def _size_from(headers: Mapping[str, str]) -> int | None:
    content_range = headers.get("Content-Range")
    if content_range:
        match = _CONTENT_RANGE_TOTAL.match(content_range.strip())
        return int(match.group(1)) if match else None
    if headers.get("Content-Encoding", "identity") != "identity":
        return None
    length = headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _hex_digest(algo: str, text: str) -> str | None:
    text = text.strip().lower()
    if len(text) == _HEX_LENGTHS[algo] and _HEX.match(text):
        return text
    return None


def _md5_from(headers: Mapping[str, str]) -> str | None:
    legacy = headers.get("x-image-meta-checksum")
    if legacy and (digest := _hex_digest("md5", legacy)):
        return digest
    value = headers.get("Content-MD5")
    if not value:
        return None
    # Glance sends hex; RFC 1864 says base64 of the 16 raw bytes. Accept both.
    if digest := _hex_digest("md5", value):
        return digest
    return _base64_digest(value, 16)


def _base64_digest(value: str, length: int) -> str | None:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == length else None


def _digest_from(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The strongest sha digest in ``Repr-Digest`` (RFC 9530) or ``Digest`` (RFC 3230)."""
    found: dict[str, str] = {}
    for header in ("Repr-Digest", "Digest"):
        for item in headers.get(header, "").split(","):
            token, sep, value = item.strip().partition("=")
            algo = _DIGEST_ALGOS.get(token.strip().lower())
            if not sep or algo is None:
                continue
            # RFC 9530 wraps the base64 value in colons (a structured byte sequence).
            digest = _base64_digest(value.strip().strip(":"), _HEX_LENGTHS[algo] // 2)
            if digest:
                found.setdefault(algo, digest)
    for algo in ("sha512", "sha256"):
        if algo in found:
            return algo, found[algo]
    return None, None
