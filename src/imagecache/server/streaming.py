"""Serving a miss: following a fill's growing file, or streaming from the origin uncached.

The route (server/images.py) decides which; these put a response together for
it and say, with ``Served``, when the request should be answered otherwise.
"""

from __future__ import annotations

import enum

from aiohttp import hdrs, web

from imagecache.fill.flight import Flight
from imagecache.fill.follow import End, failed_elsewhere, follow, relay, rest_of_body, rest_of_range
from imagecache.records import ImageInfo
from imagecache.server.cache_status import Outcome, cache_status
from imagecache.server.conditional import data_headers, etag_for
from imagecache.server.ranges import ByteRange
from imagecache.server.send import abort, complete, send_followed, send_growing, send_rest
from imagecache.server.state import ServiceState
from imagecache.upstreams.base import Caller

__all__ = ["Served", "follow_flight", "stream_through"]


class Served(enum.Enum):
    """A fill-backed request that sent nothing, and what to do instead."""

    RETRY = "retry"  # the fill ended without a file before any byte was sent
    # The cache's own disk failed under the fill before any byte was sent:
    # this client streams from the origin, uncached (DESIGN §4). A retry would
    # start another fill on the same full or broken disk.
    BYPASS = "bypass"


def data_response(
    headers: dict[str, str], wanted: ByteRange | None, size: int | None
) -> web.StreamResponse:
    """The head of an image's bytes: 206 with its Content-Range for ``wanted``, else 200.

    Content-Length is the range's length, or ``size`` (None: not known yet, chunked).
    """
    response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    if wanted is not None:
        response.headers[hdrs.CONTENT_RANGE] = wanted.content_range()
        response.content_length = wanted.length
    elif size is not None:
        response.content_length = size
    return response


async def follow_flight(
    request: web.Request,
    state: ServiceState,
    flight: Flight,
    etag: str | None,
    status: str,
    caller: Caller | None = None,
    wanted: ByteRange | None = None,
) -> web.StreamResponse | Served | None:
    """Stream the flight's file (or ``wanted`` of it) as it grows; ``status``: its Cache-Status.

    How the follow ended decides the rest (fill/follow.py, ``End``). Before any
    byte: look again (``Served.RETRY``), or, if this process's cache disk
    failed, stream from the origin (``Served.BYPASS``); a range asks the origin
    (None). After some, a fill that ended unfinished does not cost the client
    its download: with ``caller`` (not for a sibling node) it goes on from the
    origin, verified (a range: checked against what was sent), whether its
    size is known or not (a chunked body's framing never promised a length).
    Otherwise the response is aborted.
    """
    if flight.fd is None:
        # The flight ended, and closed its file, between being joined and being
        # read: a fill in another process can finish within the first look of
        # the flight that watches it. Look again: the image is cached now, or
        # the next attempt starts a fill of its own. (Seen under bench/load.py.)
        return Served.RETRY
    info, run = flight.info, state.fills.run
    headers = data_headers(info.checksum if info else None, etag, status)
    response = data_response(headers, wanted, flight.size)
    start, stop = (wanted.start, wanted.end) if wanted else (0, None)
    async with flight.reading():
        pieces = follow(flight, run, start, stop)
        ended = await send_followed(request, response, flight.image_id, pieces, run)
        if ended is None or ended.end is End.COMPLETE:
            if ended is not None and wanted is not None:
                state.metrics.bytes_from_cache.inc(wanted.length)
            return response
        if not response.prepared:
            if wanted is not None:
                return None  # the fill ended without a file: ask the origin
            if ended.end is End.WRITER_GONE:
                return Served.RETRY
            if ended.end is End.CACHE_FAILED and caller is not None:
                return Served.BYPASS
            assert ended.error is not None
            raise ended.error
        if not ended.end.resumable or caller is None or info is None:
            abort(request, flight.image_id, str(ended.error))
            return response
        invalid = state.cache.layout.invalid_path(flight.image_id)
        if wanted is None and await failed_elsewhere(flight, invalid, run):
            why = f"the fill failed in another worker process ({ended.error})"
            abort(request, flight.image_id, why)
            return response
        state.metrics.bypasses.labels("fill_failed").inc()
        if wanted is None:
            verifier = state.cache.writer(flight.image_id, info)  # never opened: verifies only
            rest = rest_of_body(
                flight, state.upstream, caller, verifier, run, state.metrics, ended.sent
            )
        else:
            state.metrics.bytes_from_cache.inc(ended.sent)
            rest = rest_of_range(
                flight, state.upstream, caller, run, state.metrics, start, ended.offset, wanted.end
            )
        await send_rest(request, response, flight.image_id, rest)
    return response


async def stream_through(
    request: web.Request,
    state: ServiceState,
    info: ImageInfo,
    caller: Caller,
    wanted: ByteRange | None,
    reason: str,
    outcome: Outcome = Outcome.BYPASS,
) -> web.StreamResponse:
    """Serve from the upstream without caching; a whole image is still verified.

    ``reason`` labels the bypass metric and the Cache-Status detail; ``outcome``
    is BYPASS, or PARTIAL for a range a fill has not reached (cache_status.py).
    """
    state.metrics.bypasses.labels(reason).inc()
    etag = etag_for(info.checksum, info.hash_algo, info.hash_value)
    headers = data_headers(info.checksum, etag, cache_status(outcome, reason))
    response = data_response(headers, wanted, info.size)
    if request.method == "HEAD":
        return response
    start, end = (wanted.start, wanted.end) if wanted else (0, None)
    verifier = state.cache.writer(info.image_id, info) if wanted is None else None
    run = state.fills.run
    stream = state.upstream.stream(info.image_id, caller, start, end)
    ended = await send_growing(request, response, relay(stream, verifier, run, state.metrics))
    if ended.error is None:
        await complete(request, response)
    elif not response.prepared:
        raise ended.error
    else:
        abort(request, info.image_id, str(ended.error))
    return response
