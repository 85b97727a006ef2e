"""``GET``/``HEAD /v2/images/{id}/file``: the route and its decisions (hit, miss, sibling, bypass).

Headers follow Glance, which image clients check; beyond Glance, ``ETag``,
``If-None-Match``, ``If-Range``, single ranges and ``HEAD`` (``server.conditional``
gives the headers, the route the answers: 304, 206, 200). Elsewhere: opening a
hit (``imagecache.hits``), what a follower of a fill may send and the rest from
the origin when the fill dies (``fill.follow``), following a fill or streaming
from the origin uncached (``server.streaming``), whether a range past a fill's
frontier waits for it (``fill.frontier``), putting bytes on the socket
(``server.send``).
"""

from __future__ import annotations

from aiohttp import web

from imagecache import hits
from imagecache.errors import NotPermitted, ResourceNotFound, UpstreamNotActive
from imagecache.fill import frontier
from imagecache.fill.flight import CACHED, Flight, FlightKind
from imagecache.layout import ImageId
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
from imagecache.server.send import send_file_span
from imagecache.server.state import STATE, ServiceState
from imagecache.server.streaming import Served, data_response, follow_flight, stream_through
from imagecache.upstreams.base import Caller

# A request whose fill ended uncommitted before it sent a byte starts over this many times.
ATTEMPTS = 3


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

    flight = _under_way(state, image_id) if peer is PeerRequest.CLIENT else None
    if flight is not None and flight.info is not None:
        # A follower of a fill running in this process: no hit to look for (the
        # image is committed only after its fill is verified) and no info to ask
        # for (the fill's is what its bytes are verified against). Each of those
        # was a trip through the disk executor, and in a herd every trip waits
        # for a turn of a loop busy sending the other followers' spans: the
        # follower's first byte came tens of milliseconds later for nothing
        # (docs/benchmarks-log.md, "The herd's first byte"). Who may read is
        # still the origin's answer.
        await check_access()
        response = await _serve_miss(request, state, image_id, flight.info, caller)
        if isinstance(response, web.StreamResponse):
            return response
        if response is Served.BYPASS:
            return await stream_through(request, state, flight.info, caller, None, "cache_failed")
    for _ in range(ATTEMPTS):
        hit = await hits.open_hit_off_loop(state.fills.run, state.cache, image_id)
        if hit is not None and hit.committing:
            # A commit (of this process or another) has renamed the file and
            # not yet recorded it; its writer holds the lock until it has. A
            # hit served now would lack its Content-MD5 and ETag: wait, look again.
            try:
                await hits.await_commit(hit)
            finally:
                await hits.close_hit(hit, state.fills.run)
            continue
        if hit is not None:
            try:
                await check_access(hit=True)
            except BaseException:
                await hits.close_hit(hit, state.fills.run)
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
            return await _bypass(request, state, info, caller, "cache_failed")
    # Fills kept ending uncommitted under us: give this client the upstream's bytes.
    info = await _info(state, image_id, caller)
    if info is None:
        return web.Response(status=204)
    # The info may be another caller's (metadata.py): the access check decides,
    # here too (a HEAD streamed through would otherwise answer without it).
    await check_access()
    return await _bypass(request, state, info, caller, "fill_retries")


async def _bypass(
    request: web.Request, state: ServiceState, info: ImageInfo, caller: Caller, reason: str
) -> web.StreamResponse:
    """The upstream's bytes, uncached, of the range asked for if there is one (If-Range
    and all, as a miss decides): a Range answered with the whole image would be a 200
    that a client asking for a slice may not expect."""
    etag = etag_for(info.checksum, info.hash_algo, info.hash_value)
    wanted = wanted_range(request, info.size, etag)
    return await stream_through(request, state, info, caller, wanted, reason)


def _under_way(state: ServiceState, image_id: ImageId) -> Flight | None:
    """This process's fill of ``image_id`` if a download may join it as it is, else None.

    Decided with a file to follow, not over, not yet verified (a verified
    fill is about to commit, and its joiner waits for the hit instead).
    """
    flight = state.fills.current(image_id)
    if (
        flight is None
        or not flight.decided.is_set()
        or flight.kind not in (FlightKind.LOCAL, FlightKind.REMOTE)
        or flight.done
        or flight.is_verified
        or flight.fd is None
    ):
        return None
    return flight


async def _info(state: ServiceState, image_id: ImageId, caller: Caller) -> ImageInfo | None:
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
    image_id: ImageId,
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
        response = data_response(headers, wanted, hit.size)
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
        await hits.close_hit(hit, state.fills.run)


async def _serve_miss(
    request: web.Request, state: ServiceState, image_id: ImageId, info: ImageInfo, caller: Caller
) -> web.StreamResponse | Served:
    etag = etag_for(info.checksum, info.hash_algo, info.hash_value)
    if none_match(request, etag):
        return not_modified(etag, cache_status(Outcome.MISS))
    wanted = wanted_range(request, info.size, etag)
    if wanted is not None:
        if request.method == "GET":
            served = await _serve_range(request, state, image_id, info, caller, etag, wanted)
            if served is not None:
                return served
        # No fill to serve it from: a part of an image is not worth one when
        # ``range_starts_fill`` is off (and could not be verified).
        return await stream_through(request, state, info, caller, wanted, "range")
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
        return await stream_through(request, state, info, caller, None, flight.reason)
    if joined is flight or flight.kind is FlightKind.REMOTE:
        state.metrics.followers.inc()
        outcome = Outcome.COLLAPSED
    else:
        state.metrics.misses.inc()
        outcome = Outcome.STORED
    followed = await follow_flight(request, state, flight, etag, cache_status(outcome), caller)
    assert followed is not None, "only a range asks the origin instead"
    return followed


async def _serve_sibling(
    request: web.Request, state: ServiceState, image_id: ImageId
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
            response = await follow_flight(
                request, state, flight, etag, cache_status(Outcome.COLLAPSED)
            )
            if isinstance(response, web.StreamResponse):
                return response
    # The fill may have committed (and its flight ended) since the caller looked.
    hit = await hits.open_hit_off_loop(state.fills.run, state.cache, image_id)
    if hit is not None:
        return await _serve_hit(request, state, image_id, hit)
    raise ResourceNotFound(f"image {image_id} is not cached on this node")


async def _serve_range(
    request: web.Request,
    state: ServiceState,
    image_id: ImageId,
    info: ImageInfo,
    caller: Caller,
    etag: str | None,
    wanted: ByteRange,
) -> web.StreamResponse | Served | None:
    """A range of an uncached image from its fill; None: from the origin, uncached (``range``).

    With ``range_starts_fill`` the range joins the image's fill, starting it
    if none runs (here or in a sibling worker process), as a whole download
    does; otherwise it only shares a fill already under way (``watch``).
    """
    if state.settings.range_starts_fill:
        joined = state.fills.current(image_id)
        flight: Flight | None = await state.fills.join(image_id, info, caller)
        assert flight is not None
        if flight.kind is FlightKind.NONE and flight.reason != CACHED:
            # Too large, no room, the cache's disk away: named as a whole download's bypass.
            return await stream_through(request, state, info, caller, wanted, flight.reason)
        started = joined is not flight and flight.kind is FlightKind.LOCAL
    else:
        flight = await state.fills.watch(image_id, info)
        started = False
    if flight is None:
        return None  # shutting down
    if flight.reason == CACHED:
        return Served.RETRY  # committed meanwhile: a hit now
    return await _follow_range(request, state, flight, etag, wanted, caller, started=started)


async def _follow_range(
    request: web.Request,
    state: ServiceState,
    flight: Flight,
    etag: str | None,
    wanted: ByteRange,
    caller: Caller,
    *,
    started: bool,
) -> web.StreamResponse | Served | None:
    """A range served from a fill in progress in this process; None to ask the origin instead.

    A range that starts past what the fill has written waits for it while the
    fill's rate says it gets there within ``range_wait_limit`` seconds
    (fill/frontier.py); otherwise it streams from the origin (``fwd=partial``,
    bypass ``range_ahead``), its bytes read a second time. Waiting, it counts
    as a reader: the fill is on demand and keeps its file open. Bytes of a
    range are never verifiable on their own (nor are the origin's); a range
    that ends with the image's last byte waits, as a whole download does,
    until the fill is verified. ``started``: this range started the fill.
    """
    await flight.decided.wait()
    if (
        flight.kind not in (FlightKind.LOCAL, FlightKind.REMOTE)
        or flight.done
        or flight.fd is None
        or flight.size is None
    ):
        return None
    # Counted as it joins, as a whole download is: a range waiting on the fill
    # shows in /metrics while it waits (one that then gives up on it is also a
    # bypass, ``range_ahead``).
    if started:
        state.metrics.misses.inc()
        status = cache_status(Outcome.STORED)
    else:
        state.metrics.followers.inc()
        status = cache_status(Outcome.COLLAPSED)
    async with flight.reading():  # left with no await before the follow's own
        reached = await frontier.reaches(flight, wanted.start, state.settings.range_wait_limit)
    if not reached:
        info = flight.info
        assert info is not None, "a flight with a size has an info"
        return await stream_through(
            request, state, info, caller, wanted, "range_ahead", Outcome.PARTIAL
        )
    return await follow_flight(request, state, flight, etag, status, caller, wanted)
