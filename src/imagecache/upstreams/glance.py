"""The ``glance`` upstream: a Glance v2 image API, with the caller's identity passed through.

``glance:http://127.0.0.1:9292``. Every call carries the caller's identity
headers (``Caller.headers``: ``X-Auth-Token`` or the trusted ``X-Roles`` /
``X-Project-Id`` set), so Glance applies its own policy to each caller. The
cache's own calls (``Caller.service``) carry the token of its Keystone
account when it has one (``identity``), and no identity otherwise.

- ``info``: ``GET /v2/images/{id}`` → size, ``checksum`` (md5),
  ``os_hash_algo``/``os_hash_value``. A status other than ``active`` raises
  ``UpstreamNotActive``; for ``deactivated`` it carries the image's info, as
  Glance still serves its data to admins.
- ``stream``: ``GET /v2/images/{id}/file`` (with ``Range`` for a part). Glance
  answers 204 for an image without data: ``UpstreamNotActive``.
  ``open_source`` is the same GET for a whole image, read with blocking calls
  by the fill pump (``http_source`` says why).
- ``check_access``: ``GET /v2/images/{id}/file`` with ``Range: bytes=0-0``.
  Glance enforces ``download_image`` (and refuses deactivated images to
  non-admins) only on the file route; the metadata GET checks the weaker
  ``get_image`` rule, so a caller allowed to *see* an image but not to
  download it would get bytes from our cache. The ranged GET asks the exact
  question. Its price is one store read of one byte per check; a ranged GET
  never fills Glance's own cache. Measured against the peer (loopback,
  noauth, file store, 1 MiB image, 2 busy cores, mean of 30): 16-29 ms
  against 9-23 ms for the metadata GET, i.e. 6-7 ms more per check
  (``pytest -s tests/upstreams/test_upstream_glance.py -k cost`` prints both).
  ``auth_cache_ttl`` keeps it off most hits; the precision is worth it.

For the server's passthrough proxy:

- ``GlanceUpstream.base_url`` — the origin, no trailing slash.
- ``await glance.request(method, path_qs, headers, body)`` → an *unread*
  ``aiohttp.ClientResponse`` from the shared session, for ``path_qs`` such as
  ``"/v2/images?limit=5"``. ``body`` is ``None``, ``bytes`` or an async
  iterable of bytes (sent chunked, so uploads stream). Redirects are not
  followed and the body is not decompressed, so the bytes can be relayed
  as they are. The caller must ``release()`` the response (or use
  ``async with``). Hop-by-hop headers are the caller's to strip; connection
  failures raise ``UpstreamError``. The read timeout is ``upstream_timeout``
  per socket read, with no total limit (uploads may be long).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterable, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

from imagecache.errors import (
    ConfigurationError,
    IdentityError,
    UpstreamError,
    UpstreamNotActive,
    UpstreamUnreachable,
)
from imagecache.keystone import ServiceIdentity
from imagecache.records import ImageInfo
from imagecache.upstreams.base import ANONYMOUS, BlockingSource, Caller, Upstream, describe_failure
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.http_client import HttpClient, raise_for_status
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents

Body = bytes | AsyncIterable[bytes] | None


class GlanceUpstream(Upstream):
    """A Glance v2 API as the origin."""

    kind = "glance"
    caller_dependent = True

    def __init__(
        self,
        base_url: str,
        config: UpstreamConfig,
        identity: ServiceIdentity | None = None,
        resume_events: ResumeEvents = NO_RESUME_EVENTS,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"glance upstream URL {base_url!r} must start with http:// or https://"
            )
        self.base_url = base_url.rstrip("/")
        self._client = HttpClient(config, resume_events)
        self.identity = identity

    async def _headers(self, caller: Caller) -> dict[str, str]:
        """What identifies ``caller`` to Glance: its own headers, or the cache's token."""
        if not caller.service:
            return dict(caller.headers)
        if self.identity is None:
            return {}  # no account of its own: the cache asks as an anonymous caller
        try:
            token = await asyncio.to_thread(self.identity.token)
        except IdentityError as exc:
            raise UpstreamError(f"the cache's own identity is unavailable: {exc}") from exc
        return {"X-Auth-Token": token}

    def _image_url(self, image_id: str, suffix: str = "") -> str:
        return f"{self.base_url}/v2/images/{quote(image_id, safe='')}{suffix}"

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        try:
            async with self._client.fetch(
                "GET", self._image_url(image_id), await self._headers(caller), short=True
            ) as response:
                raise_for_status(response, image_id, "image lookup")
                document = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(
                f"image {image_id!r}: Glance lookup failed: {describe_failure(exc)}"
            ) from exc
        image = _parse_image(image_id, document)
        status = str(image.get("status"))
        info = ImageInfo(
            image_id=image_id,
            size=_int_or_none(image.get("size")),
            checksum=_str_or_none(image.get("checksum")),
            hash_algo=_str_or_none(image.get("os_hash_algo")),
            hash_value=_str_or_none(image.get("os_hash_value")),
            status=status,
        )
        if status == "deactivated":
            # Its data is still there: Glance's file route gives it to admins
            # and answers 403 to everyone else, so the download decides.
            raise UpstreamNotActive(image_id, status, info)
        if status != "active":
            raise UpstreamNotActive(image_id, status)
        return info

    async def stream(
        self,
        image_id: str,
        caller: Caller = ANONYMOUS,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        if end is not None and end <= start:
            return
        url = self._image_url(image_id, "/file")
        headers = await self._headers(caller)
        body = self._client.stream(
            url, headers, image_id, (start, end), ("Glance download", "download"), _has_data
        )
        async with contextlib.aclosing(body):
            async for chunk in body:
                yield chunk

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource:
        headers = {**await self._headers(caller), "Accept-Encoding": "identity"}
        url = self._image_url(image_id, "/file")
        source = await self._client.open_get(url, headers, image_id)
        if source.status == 204:
            source.close()
            raise UpstreamNotActive(image_id, "without data")
        return self._client.resuming(source, url, headers, image_id)

    async def check_reachable(self) -> str:
        # Glance's version document needs no identity.
        return await self._client.reachable(f"{self.base_url}/versions", "Glance API")

    async def check_access(self, image_id: str, caller: Caller) -> None:
        # See the module docstring for why the file route and not the metadata.
        try:
            async with self._client.fetch(
                "GET",
                self._image_url(image_id, "/file"),
                {**await self._headers(caller), "Range": "bytes=0-0"},
                short=True,
            ) as response:
                # 416: the image is empty, yet the policy check passed to get there.
                if response.status != 416:
                    raise_for_status(response, image_id, "access check")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamUnreachable(
                f"image {image_id!r}: Glance access check failed: {describe_failure(exc)}"
            ) from exc

    async def request(
        self, method: str, path_qs: str, headers: Mapping[str, str], body: Body = None
    ) -> aiohttp.ClientResponse:
        """Send one request to Glance for the passthrough proxy; see the module docstring."""
        if not path_qs.startswith("/"):
            raise ValueError(f"path {path_qs!r} must start with '/'")
        try:
            return await self._client.session().request(
                method,
                self.base_url + path_qs,
                headers=dict(headers),
                data=body,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(
                f"Glance {method} {path_qs.split('?')[0]} failed: {describe_failure(exc)}"
            ) from exc

    async def close(self) -> None:
        await self._client.close()


def _has_data(image_id: str, status: int) -> None:
    # Glance answers 204 for an image without data.
    if status == 204:
        raise UpstreamNotActive(image_id, "without data")


def _parse_image(image_id: str, document: bytes) -> dict[str, Any]:
    try:
        image = json.loads(document)
    except ValueError as exc:
        raise UpstreamError(f"image {image_id!r}: Glance sent a body that is not JSON") from exc
    if not isinstance(image, dict):
        raise UpstreamError(f"image {image_id!r}: Glance sent {type(image).__name__}, not a dict")
    return image


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
