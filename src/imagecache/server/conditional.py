"""Conditional requests on image data (RFC 9110 §13) and the headers of image-data responses.

A strong ``ETag`` made from the image's recorded hash (the same for a hit and
a miss of one image), ``If-None-Match`` (the route answers 304 on a match),
``If-Range`` and which single range to serve (the header's parsing and its
400/416 are ``ranges``). Pure functions of the request's headers and the
image's record: the route (server/images.py) decides what to answer.

Headers follow Glance, which image clients check: ``Content-MD5`` carries the
image's hex md5 ``checksum`` (not the base64 of RFC 1864), on full and ranged
responses alike.
"""

from __future__ import annotations

from aiohttp import hdrs, web

from imagecache.fill.hashing import strongest_hash
from imagecache.server.cache_status import HEADER as CACHE_STATUS
from imagecache.server.ranges import ByteRange, parse_range


def etag_for(checksum: str | None, hash_algo: str | None, hash_value: str | None) -> str | None:
    """A strong entity tag from the image's hash (the same for a hit and a miss)."""
    known = strongest_hash(checksum, hash_algo, hash_value)
    return f'"{known[0]}-{known[1]}"' if known is not None else None


def none_match(request: web.Request, etag: str | None) -> bool:
    """RFC 9110 §13.1.2: If-None-Match uses the weak comparison; ``*`` matches any."""
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if header is None or etag is None:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def wanted_range(request: web.Request, size: int | None, etag: str | None) -> ByteRange | None:
    """The single range to serve, or None for the whole image.

    A bad header raises ``MalformedRange`` (400) or ``RangeNotSatisfiable``
    (416 with ``Content-Range``), straight from the parser (app.STATUS).
    """
    header = request.headers.get(hdrs.RANGE)
    if header is None or request.method not in ("GET", "HEAD"):
        return None
    if_range = request.headers.get(hdrs.IF_RANGE)
    # §13.1.5: a range is honoured only if If-Range names the current entity
    # (strong comparison); we never compare dates, so a date means "send all".
    if if_range is not None and (etag is None or if_range.strip() != etag):
        return None
    if size is None:
        return None  # §14.2: a server MAY ignore Range; without a size we cannot check it
    return parse_range(header, size)


def data_headers(checksum: str | None, etag: str | None, status: str) -> dict[str, str]:
    """An image-data response's headers; ``status`` is its ``Cache-Status`` (cache_status)."""
    headers: dict[str, str] = {
        hdrs.CONTENT_TYPE: "application/octet-stream",
        hdrs.ACCEPT_RANGES: "bytes",
        CACHE_STATUS: status,
    }
    if checksum:
        headers["Content-MD5"] = checksum
    if etag:
        headers[hdrs.ETAG] = etag
    return headers


def not_modified(etag: str | None, status: str) -> web.Response:
    headers = {CACHE_STATUS: status}
    if etag:
        headers[hdrs.ETAG] = etag
    return web.Response(status=304, headers=headers)
