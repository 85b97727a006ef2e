"""The ``http`` upstream: images behind a URL template.

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
glance upstream uses the same two (``http_client``).

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
from collections.abc import AsyncGenerator, Mapping
from urllib.parse import quote, urlsplit

import aiohttp

from imagecache.errors import ConfigurationError, UpstreamError
from imagecache.records import ImageInfo
from imagecache.upstreams.base import (
    ANONYMOUS,
    BlockingSource,
    Caller,
    Upstream,
    describe_failure,
)
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.http_client import HttpClient, raise_for_status
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents

# Hex digest length per algorithm, to reject garbage before it becomes a promise.
_HEX_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}
# Sidecars are tried strongest first; the strongest one found is the multihash.
_SIDECARS = ("sha512", "sha256", "md5")
# RFC 9530 algorithm tokens we understand, mapped to Glance's os_hash_algo names.
_DIGEST_ALGOS = {"sha-512": "sha512", "sha-256": "sha256", "sha512": "sha512", "sha256": "sha256"}
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_CONTENT_RANGE_TOTAL = re.compile(r"^bytes\s+(?:\d+-\d+|\*)/(\d+)$")


class HttpUpstream(Upstream):
    """Images fetched from a URL template containing ``{image_id}``."""

    kind = "http"

    def __init__(
        self,
        url_template: str,
        config: UpstreamConfig,
        resume_events: ResumeEvents = NO_RESUME_EVENTS,
    ) -> None:
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
        self._sidecars = config.http_checksum_sidecar
        self._client = HttpClient(config, resume_events)

    def url(self, image_id: str) -> str:
        # Ids are validated at the edge; quoting anyway keeps a URL a URL.
        return self.url_template.replace("{image_id}", quote(image_id, safe=""))

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        url = self.url(image_id)
        # The sidecars are asked beside the HEAD, not after it: across a WAN
        # each sequential request is another round trip (and a connection's
        # handshake) before a miss's first byte; the edge bench measured
        # 0.2-0.3 s to the first byte at 40 ms a round trip.
        sidecars = asyncio.ensure_future(self._read_sidecars(url)) if self._sidecars else None
        try:
            headers = await self._head(image_id, url)
        except BaseException:
            if sidecars is not None:
                sidecars.cancel()
                await asyncio.gather(sidecars, return_exceptions=True)
            raise
        size = _size_from(headers)
        checksum = _md5_from(headers)
        algo, value = _digest_from(headers)
        if sidecars is not None:
            found = await sidecars
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
        headers = {"Accept-Encoding": "identity"}
        body = self._client.stream(
            self.url(image_id), headers, image_id, (start, end), ("upstream GET", "GET")
        )
        async with contextlib.aclosing(body):
            async for chunk in body:
                yield chunk

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource:
        headers = {"Accept-Encoding": "identity"}
        url = self.url(image_id)
        source = await self._client.open_get(url, headers, image_id)
        return self._client.resuming(source, url, headers, image_id)

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
