"""Everything that is not image data or cache management goes to the Glance origin.

Requests and responses stream both ways (an upload is relayed as it arrives);
hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions. Two
routes get more than relaying:

- ``/`` and ``/versions``: the origin's version document, with the cache API
  versions (2.14 to 2.18) added and 2.18 CURRENT, as Glance lists them when its
  own cache is on, since this service does speak that API.
- ``DELETE /v2/images/{id}``: when the origin deletes the image, the local
  copy and its queue marker go too.

With an origin that is not Glance (directory, http, s3) there is nothing to
relay; the versions document is our own and ``GET /v2/images/{id}`` is
answered from ``upstream.info`` so that image clients, which read an image's
metadata before downloading it (python-glanceclient checks ``os_hash_value``),
work against those origins as well. Other ``/v2`` routes answer 404 there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from aiohttp import hdrs, web

from imagecache.cluster import delete_everywhere
from imagecache.errors import BadRequest, ResourceNotFound, UpstreamNotActive
from imagecache.layout import ImageId
from imagecache.server.auth import caller_from
from imagecache.server.state import STATE, ServiceState
from imagecache.upstreams.glance import GlanceUpstream

log = logging.getLogger(__name__)

RELAY_CHUNK = 256 * 1024
# RFC 9110 §7.6.1, plus the headers the framing of each hop decides.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
CACHE_API_VERSIONS = ("2.14", "2.15", "2.16", "2.17", "2.18")
CURRENT = "2.18"
# What a non-Glance origin is presented as: Glance's v2 history up to the cache API.
OWN_VERSIONS = tuple(f"2.{minor}" for minor in range(19))


def _forward_headers(headers: Any) -> dict[str, str]:
    connection_listed = {
        token.strip().lower() for token in headers.get(hdrs.CONNECTION, "").split(",")
    }
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in connection_listed
    }


async def _request_body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(RELAY_CHUNK):
        yield chunk


def checked_path(request: web.Request) -> None:
    """Refuse (400) a path that would mean another one once normalised.

    The routes match the path as received; a segment that is ``.`` or ``..``
    (also spelt ``%2e``), an encoded ``/`` or ``\\`` inside a segment, or an
    empty segment lets the origin's own normalisation move the request
    elsewhere: ``/v2/%2e%2e/versions`` matched ``/v2/{tail}`` and reached the
    origin's ``/versions``. Only a path that stays under ``/v2/`` as it is
    goes out.
    """
    raw = request.raw_path.split("?", 1)[0]
    segments = raw.split("/")[1:]
    for index, segment in enumerate(segments):
        decoded = unquote(segment)
        if decoded in (".", ".."):
            problem = f"the dot segment {segment!r}"
        elif "/" in decoded or "\\" in decoded:
            problem = f"an encoded slash in {segment!r}"
        elif not segment and index < len(segments) - 1:
            problem = "an empty segment (//)"
        else:
            continue
        raise BadRequest(f"path {raw!r} is not relayed: it has {problem}; send the normalised path")
    if segments[:1] != ["v2"]:
        raise BadRequest(f"path {raw!r} is not under /v2/")


async def relay(request: web.Request) -> web.StreamResponse:
    """Send the request to the Glance origin and stream its answer back."""
    checked_path(request)
    state = request.app[STATE]
    glance = state.upstream
    if not isinstance(glance, GlanceUpstream):
        if request.method == "GET" and request.match_info.get("image_id"):
            return await _synthesised_image(request, state)
        raise ResourceNotFound(f"{request.path} needs a glance upstream; this one is {glance.kind}")
    body = _request_body(request) if request.body_exists else None
    headers = _forward_headers(request.headers)
    async with await glance.request(request.method, request.path_qs, headers, body) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.update(_forward_headers(upstream.headers))
        length = upstream.headers.get(hdrs.CONTENT_LENGTH)
        if length is not None and hdrs.TRANSFER_ENCODING not in upstream.headers:
            response.content_length = int(length)
        if request.method == "DELETE" and 200 <= upstream.status < 300:
            # Before the client hears "deleted", so nothing it does next can get the old copy.
            raw = request.match_info.get("image_id")
            image_id = state.cache.layout.valid(raw) if raw is not None else None
            if image_id is not None:
                await state.fills.run(_evict, state, image_id)
                await state.metadata.forget(image_id)  # its size and checksums are gone too
        await response.prepare(request)
        if request.method != "HEAD":
            async for chunk in upstream.content.iter_chunked(RELAY_CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response


def _evict(state: ServiceState, image_id: ImageId) -> None:
    delete_everywhere(state.cache, image_id)  # every node's copy, in cluster mode
    state.cache.delete_queued_image(image_id)
    log.info("image %s deleted upstream; local copy evicted", image_id)


async def versions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    glance = state.upstream
    if not isinstance(glance, GlanceUpstream):
        document = {"versions": [_version(request, v, "SUPPORTED") for v in OWN_VERSIONS]}
        return web.json_response(
            _mark_current(document), status=300 if request.path == "/" else 200
        )
    headers = _forward_headers(request.headers)
    async with await glance.request("GET", request.path_qs, headers) as upstream:
        raw = await upstream.read()
        status = upstream.status
    try:
        document = json.loads(raw)
        listed = {entry["id"] for entry in document["versions"]}
    except (ValueError, KeyError, TypeError, RecursionError):
        return web.Response(status=status, body=raw, content_type="application/json")
    for entry in document["versions"]:
        _name_this_service(request, entry)
    for version in CACHE_API_VERSIONS:
        if f"v{version}" not in listed:
            document["versions"].append(_version(request, version, "SUPPORTED"))
    return web.json_response(_mark_current(document), status=status)


def public_base(request: web.Request) -> str:
    """This service's base URL as its callers reach it, without a trailing slash.

    ``public_url`` when set (behind a TLS terminator or a load balancer the
    request's own scheme and Host are not what clients use); else the
    request's scheme and ``Host``.
    """
    configured = request.app[STATE].settings.public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _name_this_service(request: web.Request, entry: Any) -> None:
    # The origin's document names the origin ("http://glance:9292/v2/"); a
    # client following those links would bypass the cache. Same path, our base.
    if not isinstance(entry, dict) or not isinstance(entry.get("links"), list):
        return
    base = urlsplit(public_base(request))
    for link in entry["links"]:
        if isinstance(link, dict) and isinstance(link.get("href"), str):
            href = urlsplit(link["href"])
            prefix = base.path.rstrip("/")
            link["href"] = urlunsplit(
                (base.scheme, base.netloc, prefix + href.path, href.query, href.fragment)
            )


async def v2_root(request: web.Request) -> web.StreamResponse:
    """``GET /v2``: a redirect to ``/v2/``, as Glance answers (302, Location absolute).

    Returned, not raised: a redirect is an answer, not an error (the body is
    the one aiohttp's ``HTTPFound`` had, so clients see what they saw).
    """
    location = f"{public_base(request)}/v2/"
    headers = {hdrs.CONTENT_TYPE: "text/plain; charset=utf-8", hdrs.LOCATION: location}
    return web.Response(status=302, body=b"302: Found", headers=headers)


def _version(request: web.Request, version: str, status: str) -> dict[str, Any]:
    base = public_base(request)
    return {
        "id": f"v{version}",
        "status": status,
        "links": [{"rel": "self", "href": f"{base}/v2/"}],
    }


def _mark_current(document: dict[str, Any]) -> dict[str, Any]:
    for entry in document["versions"]:
        if entry.get("id") == f"v{CURRENT}":
            entry["status"] = "CURRENT"
        elif entry.get("status") == "CURRENT":
            entry["status"] = "SUPPORTED"
    document["versions"].sort(key=_version_key, reverse=True)
    return document


def _version_key(entry: dict[str, Any]) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(entry.get("id", "")).lstrip("v").split("."))
    except ValueError:
        return (0,)


async def _synthesised_image(request: web.Request, state: ServiceState) -> web.StreamResponse:
    """A Glance-shaped image document from a non-Glance origin's ``info``."""
    image_id = state.image_id(request)
    try:
        info = await state.upstream.info(image_id, caller_from(request.headers))
        status = info.status
    except UpstreamNotActive as exc:
        info, status = None, exc.status
    return web.json_response(
        {
            "id": image_id,
            "name": image_id,
            "status": status,
            "size": info.size if info else None,
            "checksum": info.checksum if info else None,
            "os_hash_algo": info.hash_algo if info else None,
            "os_hash_value": info.hash_value if info else None,
            "disk_format": "raw",
            "container_format": "bare",
            "visibility": "public",
            "protected": False,
            "tags": [],
            "file": f"/v2/images/{image_id}/file",
            "self": f"/v2/images/{image_id}",
            "schema": "/v2/schemas/image",
        }
    )
