"""Sending image bytes to a client: a span of a file with sendfile, or what a follower is given.

One routine sends a span of a file (``send_file_span``): a hit's, and each
span a follower of a growing fill may send. ``send_growing`` sends what
``fill.follow`` yields (spans of the fill's file, or bytes) and hands back
how it ended; what to do then (complete the body, go on from the origin,
abort) is the route's decision (server/images.py).

A span goes out with ``loop.sendfile`` on a corked socket, counted for the
access log as it goes (``count_sent``: past aiohttp's writer, which never
sees these bytes); over TLS, where the kernel cannot send a file, it is read
and written in pieces instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import BinaryIO

from aiohttp import web

from imagecache.errors import ImageCacheError
from imagecache.fill.follow import End, Ended, Follow, Span
from imagecache.server.delivery import count_sent

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024

# ``run(func, *args)``: a blocking call off the loop (the service's disk executor).
Run = Callable[..., Awaitable[bytes]]


async def send_file_span(
    request: web.Request,
    response: web.StreamResponse,
    handle: BinaryIO,
    offset: int,
    count: int,
    *,
    run: Run | None = None,
    own_handle: bool = False,
) -> None:
    """Send ``count`` bytes of the file from ``offset``: zero-copy, else read/write (TLS).

    Only for a body with a Content-Length: ``loop.sendfile`` writes to the
    transport directly, past aiohttp's chunked framing. ``run`` runs the
    reads of the copy path (None: asyncio's default executor).

    ``own_handle``: the handle is this request's alone (a hit), so its file
    position may be used to learn how much a failed ``sendfile`` had sent
    (asyncio leaves it just past the last byte sent), for the access log.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        # Closing, asyncio's sendfile raises RuntimeError("Transport is closing"),
        # which nothing above takes for a client that left (server/disconnects.py
        # does for ConnectionError): seen when a follower's client left between
        # two spans of a growing file.
        raise ConnectionResetError("client went away")
    if transport.get_extra_info("sslcontext") is not None:
        # asyncio's sendfile over TLS is its own read/write fallback, and with
        # fallback=False it raises RuntimeError rather than SendfileNotAvailableError:
        # a TLS transport never reaches it (tests/server/test_server_sendfile.py).
        await _copy_span(response, run, handle, offset, count)
        return
    loop = asyncio.get_running_loop()
    with _corked(transport.get_extra_info("socket")):
        while count > 0:
            if transport.is_closing():  # it may close while the last span went out
                raise ConnectionResetError("client went away")
            if own_handle:
                os.lseek(handle.fileno(), offset, os.SEEK_SET)  # no disk access
            try:
                # fallback=False: asyncio's own fallback seeks and reads the file
                # object, and readers of one fill share it; our pread path below is
                # position-free.
                sent = await loop.sendfile(transport, handle, offset, count, fallback=False)
            except (NotImplementedError, asyncio.SendfileNotAvailableError):
                await _copy_span(response, run, handle, offset, count)  # TLS, odd files
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


async def send_growing(
    request: web.Request,
    response: web.StreamResponse,
    pieces: Follow,
    *,
    run: Run | None = None,
) -> Ended:
    """Send each span or chunk of ``pieces`` as it comes; return the ``Ended`` that ends them.

    The response is prepared before its first byte, so a follow that ends
    before any (``ended.sent`` is 0) leaves it unprepared: the caller may
    still answer otherwise. Spans go with ``send_file_span`` (the response
    must have a Content-Length), bytes with ``response.write``. A failed send
    raises (a client gone, a file short of a span) and closes ``pieces``.
    """
    # Views of the fill's descriptors (its file's; a segmented fill's scratch file's
    # for a range ahead of it), not second opens: no disk access, so fine on the
    # loop. The descriptors stay the flight's.
    handles: dict[int, BinaryIO] = {}
    try:
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                if isinstance(piece, Ended):
                    return piece
                if not response.prepared:
                    await response.prepare(request)
                if isinstance(piece, Span):
                    handle = handles.get(piece.fd)
                    if handle is None:
                        handle = open(piece.fd, "rb", buffering=0, closefd=False)  # noqa: ASYNC230, SIM115
                        handles[piece.fd] = handle
                    await send_file_span(
                        request, response, handle, piece.offset, piece.count, run=run
                    )
                else:
                    await response.write(piece)
    finally:
        for handle in handles.values():
            handle.close()
    raise AssertionError("a follow ends with an Ended")  # pragma: no cover


async def complete(request: web.Request, response: web.StreamResponse) -> None:
    """End a body that is whole (preparing a response that had no byte to send)."""
    if not response.prepared:
        await response.prepare(request)
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
    response: web.StreamResponse, run: Run | None, handle: BinaryIO, offset: int, count: int
) -> None:
    loop = asyncio.get_running_loop()
    while count > 0:
        size = min(READ_CHUNK, count)
        if run is None:
            chunk = await loop.run_in_executor(None, os.pread, handle.fileno(), size, offset)
        else:
            chunk = await run(os.pread, handle.fileno(), size, offset)
        if not chunk:
            raise ImageCacheError(f"cached file ended at byte {offset} while being sent")
        await response.write(chunk)
        offset += len(chunk)
        count -= len(chunk)


async def send_followed(
    request: web.Request, response: web.StreamResponse, image_id: str, pieces: Follow, run: Run
) -> Ended | None:
    """Send a follow, completing the body if it ends ``COMPLETE``; None: a send failed, aborted."""
    try:
        ended = await send_growing(request, response, pieces, run=run)
    except ImageCacheError as exc:  # the file was short of a span
        abort(request, image_id, str(exc))
        return None
    if ended.end is End.COMPLETE:
        await complete(request, response)
    return ended


async def send_rest(
    request: web.Request, response: web.StreamResponse, image_id: str, rest: Follow
) -> None:
    """Send the origin's rest of a body under way (``fill.follow.rest_of_*``); abort on failure."""
    try:
        ended = await send_growing(request, response, rest)
        if ended.error is not None:
            raise ended.error
        await complete(request, response)
    except (ImageCacheError, OSError) as exc:
        abort(request, image_id, f"continuing from the origin failed: {exc}")
