"""``GET``/``HEAD /v2/images/{id}/file``: the route and its decisions (hit, miss, sibling, bypass).

Headers follow Glance, which image clients check; beyond Glance, ``ETag``,
``If-None-Match``, ``If-Range``, single ranges and ``HEAD`` (``server.conditional``
gives the headers, the route the answers: 304, 206, 200). Elsewhere: opening a
hit (``imagecache.hits``), what a follower of a fill may send and the rest from
the origin when the fill dies (``fill.follow``), putting bytes on the socket
(``server.send``).
"""

from __future__ import annotations

import enum

from aiohttp import hdrs, web

from imagecache import hits
from imagecache.errors import NotPermitted, ResourceNotFound, UpstreamNotActive
from imagecache.fill.flight import CACHED, Flight, FlightKind
from imagecache.fill.follow import (
    End,
    failed_elsewhere,
    follow,
    relay,
    rest_of_body,
    rest_of_range,
)
from imagecache.records import ImageInfo
from imagecache.server.auth import Access, caller_from
from imagecache.server.cache_status import Outcome, cache_status
from imagecache.server.cluster import PeerRequest, peer_request
from imagecache.server.conditional import (
    data_headers,
    etag_for,
    none_match,
    not_modified,
    wanted_range,
)
from imagecache.server.ranges import ByteRange
from imagecache.server.send import (
    abort,
    complete,
    send_file_span,
    send_followed,
    send_growing,
    send_rest,
)
from imagecache.server.state import STATE, ServiceState
from imagecache.upstreams.base import Caller

# A range starting at most this far past what a fill in progress has written
# waits for the fill (about 50 ms at the fill rates in docs/benchmarks-log.md)
# rather than reading the origin a second time.
RANGE_FOLLOW_AHEAD = 32 * 1024 * 1024
# A request whose fill ended uncommitted before it sent a byte starts over this many times.
ATTEMPTS = 3


class Served(enum.Enum):
    """A fill-backed request that sent nothing, and what to do instead."""

    RETRY = "retry"  # the fill ended without a file before any byte was sent
    # The cache's own disk failed under the fill before any byte was sent:
    # this client streams from the origin, uncached (DESIGN §4). A retry would
    # start another fill on the same full or broken disk.
    BYPASS = "bypass"


async def image_file(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    image_id = state.image_id(request)
    caller = caller_from(request.headers)
    peer = peer_request(state.settings, request.headers)
    if peer is PeerRequest.REFUSED:
        raise NotPermitted("wrong or unexpected cluster token")
    checked = peer is not PeerRequest.CLIENT  # a sibling has asked about its own caller

    access = Access.CONFIRMED

    async def check_access(*, hit: bool = False) -> None:
        # The origin decides who may read, hit or miss (a no-op for origins
        # without callers); asked once per request, and on a miss only after
        # ``info``, so an image without data still answers Glance's 204.
        # ``hit``: the offline grace may answer for an origin that cannot.
        nonlocal checked, access
        if not checked:
            access = await state.access.check(image_id, caller, hit=hit)
            checked = True

    for _ in range(ATTEMPTS):
        hit = await state.fills.run(hits.open_hit, state.cache, image_id)
        if hit is not None and hit.committing:
            # A commit (of this process or another) has renamed the file and
            # not yet recorded it; its writer holds the lock until it has. A
            # hit served now would lack its Content-MD5 and ETag: wait, look again.
            try:
                await hits.await_commit(hit)
            finally:
                await state.fills.run(hit.handle.close)
            continue
        if hit is not None:
            try:
                await check_access(hit=True)
            except BaseException:
                await state.fills.run(hit.handle.close)
                raise
            return await _serve_hit(request, state, image_id, hit, access)
        if peer is PeerRequest.SIBLING:
            return await _serve_sibling(request, state, image_id)
        info = await _info(state, image_id, caller)
        if info is None:
            return web.Response(status=204)  # Glance: an image without data answers 204
        await check_access()
        response = await _serve_miss(request, state, image_id, info, caller)
        if isinstance(response, web.StreamResponse):
            return response
        if response is Served.BYPASS:
            return await _stream_through(request, state, info, caller, None, "cache_failed")
    # Fills kept ending uncommitted under us: give this client the upstream's bytes.
    info = await _info(state, image_id, caller)
    if info is None:
        return web.Response(status=204)
    # The info may be another caller's (metadata.py): the access check decides,
    # here too (a HEAD streamed through would otherwise answer without it).
    await check_access()
    return await _stream_through(request, state, info, caller, None, "fill_retries")


async def _info(state: ServiceState, image_id: str, caller: Caller) -> ImageInfo | None:
    """The image's info for a download; None for an image without data (Glance's 204).

    A deactivated image has data: whether this caller gets it is the access
    check's answer (Glance: 200 for an admin, 403 for others), the same on a
    cold cache as on a warm one.
    """
    try:
        return await state.metadata.info(image_id, caller)
    except UpstreamNotActive as exc:
        return exc.info


async def _serve_hit(
    request: web.Request,
    state: ServiceState,
    image_id: str,
    hit: hits.Hit,
    access: Access = Access.CONFIRMED,
) -> web.StreamResponse:
    try:
        if access is Access.OFFLINE:
            state.metrics.offline_hits.inc()  # logged by the AccessCache that allowed it
        record = hit.record
        checksum = record.checksum if record else None
        etag = etag_for(
            checksum, *(record.hash_algo, record.hash_value) if record else (None, None)
        )
        status = cache_status(Outcome.OFFLINE_HIT if access is Access.OFFLINE else Outcome.HIT)
        headers = data_headers(checksum, etag, status)
        if none_match(request, etag):
            return not_modified(etag, status)  # §2.1: a 304 made by the cache is a hit
        wanted = wanted_range(request, hit.size, etag)
        offset, count = (wanted.start, wanted.length) if wanted else (0, hit.size)
        response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
        if wanted:
            response.headers[hdrs.CONTENT_RANGE] = wanted.content_range()
        response.content_length = count
        whole = request.method == "GET" and wanted is None
        if whole:
            # Counted before any byte goes out, so a client holding its last
            # byte finds the hit in a listing made right after (counted after
            # the send, it raced that listing). A client that leaves midway
            # still counts, as in Glance, whose driver counts when the file closes.
            await hits.record_hit(state.cache, image_id, state.fills.run)
        await response.prepare(request)
        if request.method != "HEAD" and count > 0:
            await send_file_span(
                request, response, hit.handle, offset, count, run=state.fills.run, own_handle=True
            )
        await response.write_eof()
        state.metrics.bytes_from_cache.inc(0 if request.method == "HEAD" else count)
        if whole:
            state.metrics.hits.inc()
        return response
    finally:
        await state.fills.run(hit.handle.close)


async def _serve_miss(
    request: web.Request, state: ServiceState, image_id: str, info: ImageInfo, caller: Caller
) -> web.StreamResponse | Served:
    etag = etag_for(info.checksum, info.hash_algo, info.hash_value)
    if none_match(request, etag):
        return not_modified(etag, cache_status(Outcome.MISS))
    wanted = wanted_range(request, info.size, etag)
    if wanted is not None:
        if request.method == "GET":
            # A fill under way, here or in a sibling worker process, serves
            # the range from its file; the range alone never starts one.
            flight = await state.fills.watch(image_id, info)
            if flight is not None and flight.reason == CACHED:
                return Served.RETRY  # committed meanwhile: a hit now
            if flight is not None:
                followed = await _follow_range(request, state, flight, etag, wanted, caller)
                if isinstance(followed, web.StreamResponse):
                    return followed
        # A part of an image is not worth a fill (and could not be verified).
        return await _stream_through(request, state, info, caller, wanted, "range")
    if request.method == "HEAD":
        response = web.StreamResponse(
            status=200, headers=data_headers(info.checksum, etag, cache_status(Outcome.MISS))
        )
        if info.size is not None:
            response.content_length = info.size
        return response
    joined = state.fills.current(image_id)
    flight = await state.fills.join(image_id, info, caller)
    if flight.is_verified and not flight.done:
        # Every byte is in and verified, the commit is milliseconds away: wait
        # for it and serve the entry as the hit it is about to be (a client
        # asking again right after its download would otherwise be counted as
        # a follower, and its read would not count for the LRU order).
        await state.fills.settled(flight)
        return Served.RETRY
    if flight.kind is FlightKind.NONE:
        if flight.reason == CACHED:
            return Served.RETRY
        return await _stream_through(request, state, info, caller, None, flight.reason)
    if joined is flight or flight.kind is FlightKind.REMOTE:
        state.metrics.followers.inc()
        outcome = Outcome.COLLAPSED
    else:
        state.metrics.misses.inc()
        outcome = Outcome.STORED
    followed = await _follow(request, state, flight, etag, cache_status(outcome), caller)
    assert followed is not None, "only a range asks the origin instead"
    return followed


async def _serve_sibling(
    request: web.Request, state: ServiceState, image_id: str
) -> web.StreamResponse:
    """A sibling's miss here: share a fill in progress, never start one (it could ask back)."""
    flight = state.fills.current(image_id)
    if flight is not None:
        await flight.decided.wait()
        if flight.kind in (FlightKind.LOCAL, FlightKind.REMOTE) and request.method == "GET":
            info = flight.info
            etag = etag_for(
                *(info.checksum, info.hash_algo, info.hash_value) if info else (None,) * 3
            )
            response = await _follow(request, state, flight, etag, cache_status(Outcome.COLLAPSED))
            if isinstance(response, web.StreamResponse):
                return response
    # The fill may have committed (and its flight ended) since the caller looked.
    hit = await state.fills.run(hits.open_hit, state.cache, image_id)
    if hit is not None:
        return await _serve_hit(request, state, image_id, hit)
    raise ResourceNotFound(f"image {image_id} is not cached on this node")


async def _follow(
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
    response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    if wanted is not None:
        response.headers[hdrs.CONTENT_RANGE] = wanted.content_range()
        response.content_length = wanted.length
    elif flight.size is not None:
        response.content_length = flight.size
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
        invalid = state.cache.driver.layout.invalid_path(flight.image_id)
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


async def _follow_range(
    request: web.Request,
    state: ServiceState,
    flight: Flight,
    etag: str | None,
    wanted: ByteRange,
    caller: Caller,
) -> web.StreamResponse | Served | None:
    """A range served from a fill in progress in this process; None to ask the origin instead.

    Followed when the range starts at most ``RANGE_FOLLOW_AHEAD`` bytes past
    what the fill has written: waiting for the fill to get there is cheaper
    than a second upstream read. Bytes of a range are never verifiable on their
    own (nor are the origin's); a range that ends with the image's last byte
    waits, as a whole download does, until the fill is verified.
    """
    await flight.decided.wait()
    if (
        flight.kind not in (FlightKind.LOCAL, FlightKind.REMOTE)
        or flight.done
        or flight.fd is None
        or flight.size is None
        or wanted.start > flight.available + RANGE_FOLLOW_AHEAD
    ):
        return None
    state.metrics.followers.inc()
    status = cache_status(Outcome.COLLAPSED)
    return await _follow(request, state, flight, etag, status, caller, wanted)


async def _stream_through(
    request: web.Request,
    state: ServiceState,
    info: ImageInfo,
    caller: Caller,
    wanted: ByteRange | None,
    reason: str,
) -> web.StreamResponse:
    """Serve from the upstream without caching; a whole image is still verified."""
    state.metrics.bypasses.labels(reason).inc()
    etag = etag_for(info.checksum, info.hash_algo, info.hash_value)
    headers = data_headers(info.checksum, etag, cache_status(Outcome.BYPASS, reason))
    response = web.StreamResponse(status=206 if wanted else 200, headers=headers)
    if wanted is not None:
        response.headers[hdrs.CONTENT_RANGE] = wanted.content_range()
        response.content_length = wanted.length
    elif info.size is not None:
        response.content_length = info.size
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
