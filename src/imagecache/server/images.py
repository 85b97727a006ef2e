"""``GET``/``HEAD /v2/images/{id}/file``: hits from disk with sendfile, misses through a fill.

Headers follow Glance, which image clients check: ``Content-MD5`` carries the
image's hex md5 ``checksum`` (not the base64 of RFC 1864), on full and ranged
responses alike. Beyond Glance: a strong ``ETag`` made from the image's
recorded hash, so a hit and a miss of one image carry the same tag,
``If-None-Match`` (304), ``If-Range``, single-range requests served from the
cache (see ``ranges`` for the decisions) and ``HEAD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from aiohttp import hdrs, web

from imagecache.errors import (
    CacheStoreError,
    ImageCacheError,
    NotPermitted,
    ResourceNotFound,
    UpstreamNotActive,
    WriterGone,
)
from imagecache.fill.flight import CACHED, COMMIT_WAIT, REMOTE_POLL_INTERVAL, Flight, FlightKind
from imagecache.fill.hashing import strongest_hash
from imagecache.fill.locks import locked_by_writer
from imagecache.fill.pump import aclose
from imagecache.fill.writer import FillWriter
from imagecache.records import CachedImage, ImageInfo
from imagecache.server.auth import Access, caller_from
from imagecache.server.cache_status import HEADER as CACHE_STATUS
from imagecache.server.cache_status import Outcome, cache_status
from imagecache.server.cluster import PeerRequest, peer_request
from imagecache.server.delivery import count_sent
from imagecache.server.ranges import ByteRange, parse_range
from imagecache.server.state import STATE, ServiceState
from imagecache.upstreams.base import Caller

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
# A range starting at most this far past what a fill in progress has written
# waits for the fill (about 50 ms at the fill rates in docs/benchmarks-log.md)
# rather than reading the origin a second time.
RANGE_FOLLOW_AHEAD = 32 * 1024 * 1024
# A request whose fill ended uncommitted before it sent a byte starts over this many times.
ATTEMPTS = 3


class Served(enum.Enum):
    """What a fill-backed response turned out to be."""

    RETRY = "retry"  # the fill ended without a file before any byte was sent
    # The cache's own disk failed under the fill before any byte was sent:
    # this client streams from the origin, uncached (DESIGN §4). A retry would
    # start another fill on the same full or broken disk.
    BYPASS = "bypass"


@dataclass(frozen=True)
class _Hit:
    handle: BinaryIO
    size: int
    record: CachedImage | None
    committing: bool = False  # a writer holds the file's lock: wait for its record


def etag_for(checksum: str | None, hash_algo: str | None, hash_value: str | None) -> str | None:
    """A strong entity tag from the image's hash (the same for a hit and a miss)."""
    known = strongest_hash(checksum, hash_algo, hash_value)
    return f'"{known[0]}-{known[1]}"' if known is not None else None


def _none_match(request: web.Request, etag: str | None) -> bool:
    """RFC 9110 §13.1.2: If-None-Match uses the weak comparison; ``*`` matches any."""
    header = request.headers.get(hdrs.IF_NONE_MATCH)
    if header is None or etag is None:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def _wanted_range(request: web.Request, size: int | None, etag: str | None) -> ByteRange | None:
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


def _headers(checksum: str | None, etag: str | None, status: str) -> dict[str, str]:
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
        hit = await state.fills.run(_open_hit, state, image_id)
        if hit is not None and hit.committing:
            # A commit (of this process or another) has renamed the file and
            # not yet recorded it; its writer holds the lock until it has. A
            # hit served now would lack its Content-MD5 and ETag: wait, look again.
            try:
                await _await_commit(hit)
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


def _not_modified(etag: str | None, status: str) -> web.Response:
    headers = {CACHE_STATUS: status}
    if etag:
        headers[hdrs.ETAG] = etag
    return web.Response(status=304, headers=headers)


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


async def _await_commit(hit: _Hit) -> None:
    """Wait (at most ``COMMIT_WAIT``) until no writer holds the lock of ``hit``'s file.

    Polled like a fill in another process: flock on an open descriptor,
    non-blocking, never waits on the disk, so it runs on the loop.
    """
    deadline = time.monotonic() + COMMIT_WAIT
    # No event to wait on: the writer may be another process, which tells us
    # nothing but its lock.
    while locked_by_writer(hit.handle.fileno()) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(REMOTE_POLL_INTERVAL)


def _open_hit(state: ServiceState, image_id: str) -> _Hit | None:
    """In a thread: open the committed file and read its record (None on a miss)."""
    handle = state.cache.driver.layout.open_committed(image_id)  # never through a symlink
    if handle is None:
        return None
    try:
        st = os.fstat(handle.fileno())
        # The lock first, then the record: a writer records before it unlocks,
        # so a lock found free means the record read next is the file's. Read
        # the other way round, a commit finishing between the two reads left
        # no record and no lock, and the hit went out without its ETag or
        # Content-MD5 (a 200 instead of a 304 for If-None-Match).
        committing = locked_by_writer(handle.fileno())
        record = state.cache.get_cached_image(image_id)
    except BaseException:
        handle.close()
        raise
    if record is None:
        # Committing: the caller waits for the record. Else a file without a
        # record (adopted, or the driver lost it): served without ETag.
        return _Hit(handle, st.st_size, None, committing=committing)
    if record.size != st.st_size:
        if committing:
            # A fill renamed its file (a new one, or over an older entry) and
            # has not yet recorded it: the caller waits for that commit.
            return _Hit(handle, st.st_size, None, committing=True)
        # Cut short (or grown) behind the cache's back: served, it would be a
        # 200 with the short length and the whole image's ETag. A miss instead:
        # the caller refills it from the origin.
        handle.close()
        try:
            state.cache.quarantine(
                image_id,
                f"its file has {st.st_size} bytes, its record {record.size}",
                inode=st.st_ino,
            )
        except (OSError, ImageCacheError) as exc:  # a read-only disk: still never served
            log.error("could not quarantine the damaged cache file of %s: %s", image_id, exc)
        return None
    return _Hit(handle, st.st_size, record)


async def _serve_hit(
    request: web.Request,
    state: ServiceState,
    image_id: str,
    hit: _Hit,
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
        headers = _headers(checksum, etag, status)
        if _none_match(request, etag):
            return _not_modified(etag, status)  # §2.1: a 304 made by the cache is a hit
        wanted = _wanted_range(request, hit.size, etag)
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
            await _record_hit(state, image_id)
        await response.prepare(request)
        if request.method == "HEAD" or count == 0:
            await response.write_eof()
        else:
            await _send_span(request, response, state, hit.handle, offset, count, own_handle=True)
            await response.write_eof()
        state.metrics.bytes_from_cache.inc(0 if request.method == "HEAD" else count)
        if whole:
            state.metrics.hits.inc()
        return response
    finally:
        await state.fills.run(hit.handle.close)


async def _record_hit(state: ServiceState, image_id: str) -> None:
    try:
        await state.fills.run(state.cache.driver.record_hit, image_id)
    except Exception as exc:  # a hit counter must never cost the client its image
        log.warning("recording a hit of %s failed: %s", image_id, exc)


async def _send_span(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    handle: BinaryIO,
    offset: int,
    count: int,
    *,
    own_handle: bool = False,
) -> None:
    """Send ``count`` bytes of the file from ``offset``: zero-copy, else read/write (TLS).

    Only for a body with a Content-Length: ``loop.sendfile`` writes to the
    transport directly, past aiohttp's chunked framing.

    ``own_handle``: the handle is this request's alone (a hit), so its file
    position may be used to learn how much a failed ``sendfile`` had sent
    (asyncio leaves it just past the last byte sent), for the access log.
    """
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    with _corked(transport.get_extra_info("socket")):
        while count > 0:
            if own_handle:
                os.lseek(handle.fileno(), offset, os.SEEK_SET)  # no disk access
            try:
                # fallback=False: asyncio's own fallback seeks and reads the file
                # object, and readers of one fill share it; our pread path below is
                # position-free.
                sent = await loop.sendfile(transport, handle, offset, count, fallback=False)
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                await _copy_span(response, state, handle, offset, count)  # TLS, odd files
                return
            except BaseException as exc:
                if own_handle:
                    count_sent(request, os.lseek(handle.fileno(), 0, os.SEEK_CUR) - offset)
                if isinstance(exc, ConnectionError):
                    # os.sendfile writes to the socket behind the transport's back,
                    # so the transport has not seen the client go; abort it so that
                    # what runs next (server/disconnects.py, aiohttp) sees it left.
                    transport.abort()
                raise
            # asyncio returns a short count when os.sendfile meets the end of the
            # file. Ignoring it would leave the client waiting for the rest of its
            # Content-Length forever; so send on, and fail loudly if nothing goes.
            if sent <= 0:
                raise ImageCacheError(f"cached file ended at byte {offset} while being sent")
            count_sent(request, sent)  # past aiohttp's writer: the access log counts it here
            offset += sent
            count -= sent


@contextlib.contextmanager
def _corked(sock: socket.socket | None) -> Iterator[None]:
    """TCP_CORK on the client's TCP socket while in the block; uncorked after.

    Corked, the kernel sends only full segments. Without it, with aiohttp's
    TCP_NODELAY, every 64 KiB piece ``sendfile`` moves became a full segment
    plus a 53-byte one (the loopback MSS is 65,483), each costing the client a
    wake-up. One-client 1 GiB hits: 1,884 MiB/s uncorked, 2,528 corked, nginx
    (which corks: ``tcp_nopush on``) 2,267 in the same rounds
    (docs/benchmarks-log.md, "The one-client hit: TCP_CORK"). Uncorking sends the
    last partial segment at once, not 200 ms later.
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        yield
        return
    with contextlib.suppress(OSError):  # the client is gone; the send says so
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


async def _copy_span(
    response: web.StreamResponse, state: ServiceState, handle: BinaryIO, offset: int, count: int
) -> None:
    while count > 0:
        chunk = await state.fills.run(os.pread, handle.fileno(), min(READ_CHUNK, count), offset)
        if not chunk:
            raise ImageCacheError(f"cached file ended at byte {offset} while being sent")
        await response.write(chunk)
        offset += len(chunk)
        count -= len(chunk)


async def _serve_miss(
    request: web.Request, state: ServiceState, image_id: str, info: ImageInfo, caller: Caller
) -> web.StreamResponse | Served:
    etag = etag_for(info.checksum, info.hash_algo, info.hash_value)
    if _none_match(request, etag):
        return _not_modified(etag, cache_status(Outcome.MISS))
    wanted = _wanted_range(request, info.size, etag)
    if wanted is not None:
        if request.method == "GET":
            # A fill under way, here or in a sibling worker process, serves
            # the range from its file; the range alone never starts one.
            flight = await state.fills.watch(image_id, info)
            if flight is not None and flight.reason == CACHED:
                return Served.RETRY  # committed meanwhile: a hit now
            if flight is not None:
                followed = await _follow_range(request, state, flight, etag, wanted, caller)
                if followed is not None:
                    return followed
        # A part of an image is not worth a fill (and could not be verified).
        return await _stream_through(request, state, info, caller, wanted, "range")
    if request.method == "HEAD":
        response = web.StreamResponse(
            status=200, headers=_headers(info.checksum, etag, cache_status(Outcome.MISS))
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
    return await _follow(request, state, flight, etag, cache_status(outcome), caller)


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
    hit = await state.fills.run(_open_hit, state, image_id)
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
) -> web.StreamResponse | Served:
    """Stream the flight's file to the client as it grows; ``status`` is its Cache-Status.

    With ``caller`` (not for a sibling node), a fill that ends unfinished
    after the client has had bytes (this process's cache disk failed, or the
    writing process died) does not cost the client its download: it goes on
    from the origin (``_finish_from_origin``), whether its size is known or
    not. Otherwise the response is aborted. Before any byte, the caller looks
    again (``Served.RETRY``), or, if this process's cache disk failed, streams
    from the origin (``Served.BYPASS``).
    """
    if flight.fd is None:
        # The flight ended, and closed its file, between being joined and being
        # read: a fill in another process can finish within the first look of
        # the flight that watches it. Look again: the image is cached now, or
        # the next attempt starts a fill of its own. (Seen under bench/load.py.)
        return Served.RETRY
    info = flight.info
    response = web.StreamResponse(headers=_headers(info.checksum if info else None, etag, status))
    if flight.size is not None:
        response.content_length = flight.size
    sent = _Sent()
    async with flight.reading():
        try:
            if flight.size is not None:
                await _follow_sized(request, response, state, flight, sent=sent)
            else:
                async for chunk in flight.chunks(state.fills.run):
                    if not response.prepared:
                        await response.prepare(request)
                    await response.write(chunk)
                    sent.offset += len(chunk)
            if not response.prepared:
                await response.prepare(request)
            await response.write_eof()
        except WriterGone as exc:
            if not response.prepared:
                return Served.RETRY
            await _finish_or_abort(request, response, state, flight, caller, sent.offset, exc)
        except ImageCacheError as exc:
            if not response.prepared:
                if caller is not None and _ended_unfinished(flight, exc):
                    return Served.BYPASS
                raise
            if _ended_unfinished(flight, exc):
                await _finish_or_abort(request, response, state, flight, caller, sent.offset, exc)
            else:
                abort(request, flight.image_id, str(exc))
    return response


def _ended_unfinished(flight: Flight, exc: Exception) -> bool:
    """Whether ``exc`` ended ``flight`` with bytes that are right as far as they go.

    So its readers may go on from the origin: the writer died (``WriterGone``)
    or this process's own disk failed. A fill that failed verification, or one
    of another process that failed for its own reasons, did not.
    """
    return isinstance(exc, WriterGone) or (
        isinstance(exc, CacheStoreError) and flight.kind is FlightKind.LOCAL
    )


async def _finish_or_abort(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    flight: Flight,
    caller: Caller | None,
    sent: int,
    why: ImageCacheError,
) -> None:
    # A body of unknown size goes on too: it is chunked, so the rest from the
    # origin simply follows, and the client's framing never promised a length.
    if caller is None or flight.info is None:  # a sibling's request: it finishes on its own
        abort(request, flight.image_id, str(why))
    elif await _failed_elsewhere(state, flight):
        abort(request, flight.image_id, f"the fill failed in another worker process ({why})")
    else:
        await _finish_from_origin(request, response, state, flight, caller, sent)


async def _failed_elsewhere(state: ServiceState, flight: Flight) -> bool:
    """Whether the other process's fill that ``flight`` followed failed, rather than died.

    A writer moves a failed fill's file to ``invalid/`` before it lets go of
    its lock; one that died leaves it in ``incomplete/``. Only a dead writer's
    readers go on from the origin: a fill may fail because the origin changed
    the image (a refused resume, upstreams/resume.py), and the rest read from
    the origin from the reader's byte, with no version to hold it to, would be
    the new version's spliced onto the old (seen on the WAN rig,
    tests/test_wan_fills.py; the final hash caught it only where the origin
    promised one).
    """
    fd = flight.fd
    if flight.kind is not FlightKind.REMOTE or fd is None:
        return False
    invalid = state.cache.driver.layout.invalid_path(flight.image_id)
    try:
        moved, ours = await state.fills.run(lambda: (os.stat(invalid), os.fstat(fd)))
    except FileNotFoundError:
        return False
    return (moved.st_dev, moved.st_ino) == (ours.st_dev, ours.st_ino)


@dataclass
class _Sent:
    """How far a follower's body has gone: the offset of its next byte."""

    offset: int = 0


async def _finish_from_origin(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    flight: Flight,
    caller: Caller,
    sent: int,
) -> None:
    """The rest of a body whose fill ended unfinished, read from the origin, still verified.

    The client has bytes ``[0, sent)`` from the fill's file. They are hashed
    from that file, which nobody writes any more: its fill was rolled back, or
    its writer is dead (a process taking over a dead writer's fill starts a
    new file, drivers/files.py), and a writer only ever appends. The rest
    comes from the origin from byte ``sent``, and the last piece waits for the
    hash of the whole, as in a stream-through. Every follower of the failed
    fill reads the origin on its own: single-flight ends with the cache copy.
    """
    info, fd = flight.info, flight.fd
    assert info is not None, "a fill started by a client's miss has its info"
    assert fd is not None, "a reader keeps the flight's file open"
    log.warning(
        "the fill of %s ended unfinished; continuing a download from the origin at byte %d",
        flight.image_id,
        sent,
    )
    state.metrics.bypasses.labels("fill_failed").inc()
    verifier = state.cache.writer(flight.image_id, info)  # never opened: verifies only

    async def hashed_first(stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        offset = 0
        while offset < sent:
            data = await state.fills.run(os.pread, fd, min(READ_CHUNK, sent - offset), offset)
            if not data:
                raise CacheStoreError(f"the cache file of {flight.image_id!r} shrank")
            await state.fills.run(verifier.write, data)
            offset += len(data)
        async for chunk in stream:
            yield chunk

    stream = state.upstream.stream(flight.image_id, caller, sent)
    await _continue_from_origin(request, response, state, flight, stream, hashed_first, verifier)


async def _continue_from_origin(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    flight: Flight,
    stream: AsyncGenerator[bytes, None],
    prepare: Callable[[AsyncIterator[bytes]], AsyncGenerator[bytes, None]],
    verifier: FillWriter | None,
) -> None:
    """Relay what ``prepare`` makes of the origin's ``stream``; abort on any failure."""
    try:
        async with contextlib.aclosing(prepare(stream)) as rest:
            await _relay(request, response, state, rest, verifier)
    except (ImageCacheError, OSError) as exc:
        abort(request, flight.image_id, f"continuing from the origin failed: {exc}")
    finally:
        await aclose(stream)


async def _follow_range(
    request: web.Request,
    state: ServiceState,
    flight: Flight,
    etag: str | None,
    wanted: ByteRange,
    caller: Caller,
) -> web.StreamResponse | None:
    """A range served from a fill in progress in this process; None to ask the origin instead.

    Followed when the range starts at most ``RANGE_FOLLOW_AHEAD`` bytes past
    what the fill has written: waiting for the fill to get there is cheaper
    than a second upstream read. Bytes of a range are never verifiable on their
    own (nor are the origin's); a range that ends with the image's last byte
    waits, as a whole download does, until the fill is verified. A fill that
    ends unfinished under a range already under way (its writer died, or this
    process's disk failed) hands the rest of the range to the origin, as a
    whole download's does; a fill that failed verification aborts it.
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
    info = flight.info
    response = web.StreamResponse(
        status=206,
        headers=_headers(info.checksum if info else None, etag, cache_status(Outcome.COLLAPSED)),
    )
    response.headers[hdrs.CONTENT_RANGE] = wanted.content_range()
    response.content_length = wanted.length
    state.metrics.followers.inc()
    sent = _Sent(wanted.start)
    async with flight.reading():
        try:
            await _follow_sized(request, response, state, flight, wanted.start, wanted.end, sent)
        except (WriterGone, ImageCacheError) as exc:
            if not response.prepared:
                return None  # the fill ended without a file: ask the origin
            if not _ended_unfinished(flight, exc):
                abort(request, flight.image_id, str(exc))
                return response
            state.metrics.bytes_from_cache.inc(sent.offset - wanted.start)
            await _finish_range_from_origin(request, response, state, flight, caller, sent, wanted)
            return response
    if not response.prepared:
        await response.prepare(request)
    await response.write_eof()
    state.metrics.bytes_from_cache.inc(wanted.length)
    return response


async def _finish_range_from_origin(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    flight: Flight,
    caller: Caller,
    sent: _Sent,
    wanted: ByteRange,
) -> None:
    """The rest of a range, ``[sent.offset, wanted.end)``, from the origin.

    A range has no checksum, so what the client already has from the
    unfinished fill's file is checked against the origin instead: the origin
    is read from the range's start, the bytes already sent are compared with
    the file's, and only if they all match does the rest follow (otherwise the
    response is aborted, and the client drops what it had). The range then
    holds exactly the origin's bytes, as one streamed through would. (Found by
    the crash soak, tests/test_soak.py: a range to the image's end that had
    every byte but the last when its writer was killed used to be aborted.)
    """
    fd = flight.fd
    assert fd is not None, "a reader keeps the flight's file open"
    log.warning(
        "the fill of %s ended unfinished; checking a range's first %d bytes against the"
        " origin and continuing from it",
        flight.image_id,
        sent.offset - wanted.start,
    )
    state.metrics.bypasses.labels("fill_failed").inc()

    async def past_matching(stream: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
        # The origin's bytes past what was sent, once those before it match the file's.
        offset = wanted.start
        async for chunk in stream:
            if offset >= sent.offset:
                yield chunk
                continue
            mine = min(len(chunk), sent.offset - offset)
            ours = await state.fills.run(os.pread, fd, mine, offset)
            if ours != chunk[:mine]:
                raise CacheStoreError(
                    f"bytes {offset}-{offset + mine - 1} sent from the unfinished fill differ"
                    " from the origin's"
                )
            offset += len(chunk)
            if mine < len(chunk):
                yield chunk[mine:]

    stream = state.upstream.stream(flight.image_id, caller, wanted.start, wanted.end)
    await _continue_from_origin(request, response, state, flight, stream, past_matching, None)


async def _follow_sized(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    flight: Flight,
    start: int = 0,
    end: int | None = None,
    sent: _Sent | None = None,
) -> None:
    """Bytes ``[start, end)`` of a body of known size, each span with sendfile as it lands.

    ``sent``, if given, follows the offset of the next byte to send.

    Readers of a fill (its first client included) send the file as it lands,
    like a hit, instead of copying 1 MiB pieces through Python: less CPU and
    no per-client buffers. ``spans`` still holds back the last byte until the
    fill is verified.
    """
    fd = flight.fd
    assert fd is not None, "a decided flight with readers keeps its file open"
    assert flight.size is not None
    stop = flight.size if end is None else end
    # A view of the flight's descriptor, not a second open (no disk access, so
    # fine on the loop); the descriptor stays the flight's.
    with open(fd, "rb", buffering=0, closefd=False) as handle:  # noqa: ASYNC230
        async for offset, count in flight.spans(start):
            count = min(count, stop - offset)
            if not response.prepared:
                await response.prepare(request)
            await _send_span(request, response, state, handle, offset, count)
            if sent is not None:
                sent.offset = offset + count
            if offset + count >= stop:
                break


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
    headers = _headers(info.checksum, etag, cache_status(Outcome.BYPASS, reason))
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
    stream = state.upstream.stream(info.image_id, caller, start, end)
    try:
        await _relay(request, response, state, stream, verifier)
    except ImageCacheError as exc:
        if not response.prepared:
            raise
        abort(request, info.image_id, str(exc))
    finally:
        await aclose(stream)
    return response


async def _relay(
    request: web.Request,
    response: web.StreamResponse,
    state: ServiceState,
    stream: AsyncIterator[bytes],
    verifier: FillWriter | None,
) -> None:
    """Send the origin's chunks; with a ``verifier``, the last one only once the whole matches.

    ``verifier`` is a writer that was never opened: it hashes, it stores nothing.
    """
    held: bytes | None = None
    async for chunk in stream:
        if not chunk:
            continue
        state.metrics.bytes_from_upstream.inc(len(chunk))
        if verifier is not None:
            await state.fills.run(verifier.write, chunk)
        if held is not None:
            if not response.prepared:
                await response.prepare(request)
            await response.write(held)
        held = chunk
    if verifier is not None:
        await state.fills.run(verifier.verify)
    if not response.prepared:
        await response.prepare(request)
    if held is not None:
        await response.write(held)
    await response.write_eof()


def abort(request: web.Request, image_id: str, why: str) -> None:
    """End a response whose body is already under way without completing it.

    Closing the connection before the last byte (Content-Length) or before the
    terminating chunk (chunked) is the only way HTTP/1.1 lets a server say
    "this body is wrong" once the status line is out; clients report it as an
    error instead of keeping a short or unverified image.
    """
    log.warning("aborting the download of %s: %s", image_id, why)
    request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()
