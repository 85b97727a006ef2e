"""What each response delivered: its request id, its status, the bytes sent, whether it completed.

One ``Delivery`` per request, made by the outermost middleware and filled in
as the response goes out; the access log reads it. Bytes are counted as they
are handed to the socket (aiohttp's writer reports each body write; the
sendfile path of a hit reports its own), never taken from the declared
``Content-Length``, so a download cut short logs what it really sent.

Every response carries ``x-openstack-request-id`` as Glance's do: the origin's
when the response is a relayed one that had it, else ``req-<uuid4>`` made
here, which is also what the access log line names.

An image-data response's ``Cache-Status`` (server/cache_status.py) is
recorded here as the response is prepared, read from the header itself, so
the access log names exactly what the client was told.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from imagecache.logsafe import escape
from imagecache.server.cache_status import HEADER as CACHE_STATUS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "x-openstack-request-id"


@dataclass
class Delivery:
    """One request's outcome, as far as its client is concerned."""

    request_id: str
    status: int | None = None  # of the first response started; None: none was
    declared: int | None = None  # its Content-Length, when it had one
    head_only: bool = False  # a response that has no body by definition
    sent: int = 0  # body bytes handed to the socket
    failed: bool = False  # the handler raised after the response had started
    logged: bool = False  # its access line is written
    cache_status: str | None = None  # its Cache-Status header, if it had one
    started: float = field(default_factory=time.monotonic)

    def count(self, body_bytes: int, _output_size: int = 0) -> None:
        self.sent += body_bytes

    @property
    def completed(self) -> bool:
        """Whether the client got the whole response its headers announced."""
        if self.status is None or self.failed:
            return False
        if self.head_only:
            return True
        return self.declared is None or self.sent >= self.declared


DELIVERY = web.RequestKey("delivery", Delivery)


def new_request_id() -> str:
    return f"req-{uuid.uuid4()}"


def delivery_of(request: web.BaseRequest) -> Delivery | None:
    found = request.get(DELIVERY)
    return found if isinstance(found, Delivery) else None


def count_sent(request: web.BaseRequest, body_bytes: int) -> None:
    """Count bytes sent past aiohttp's writer (``loop.sendfile``)."""
    delivery = delivery_of(request)
    if delivery is not None:
        delivery.count(body_bytes)


@web.middleware
async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: start the request's ``Delivery``, note a failure mid-body."""
    delivery = Delivery(new_request_id())
    request[DELIVERY] = delivery
    try:
        return await handler(request)
    except web.HTTPException:
        raise  # an answer, not a failure: it is sent as the response
    except BaseException:
        if delivery.status is not None:
            delivery.failed = True
            # aiohttp writes no access line for a response that broke after
            # it started (it cannot send its own 500 then): write it here.
            write_access_line(
                ACCESS_LOG, request, delivery.status, time.monotonic() - delivery.started
            )
        raise


ACCESS_LOG = logging.getLogger("imagecache.access")


def write_access_line(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    request: web.BaseRequest,
    status: int,
    duration: float,
) -> None:
    """The request's one access line (docs/service.md, "The access log"); once per request.

    ``bytes`` counts the body bytes actually handed to the socket and
    ``completed`` says whether that was the whole response; ``cache`` is the
    response's ``Cache-Status``, quoted (it holds spaces), ``-`` without one.
    Every field is escaped (``logsafe.escape``) and the path is logged still
    percent-encoded (as in the request line), so a path with ``%0a`` or a
    space cannot start a line or a field of its own.

    The fields also go on the record as ``access`` (unescaped, typed), which
    the JSON log format writes as keys of their own (server/logs.py).
    """
    delivery = delivery_of(request)
    sent, completed, request_id, cache = 0, False, "-", None
    if delivery is not None:
        if delivery.logged:
            return
        delivery.logged = True
        status = delivery.status if delivery.status is not None else status
        sent, completed, request_id = delivery.sent, delivery.completed, delivery.request_id
        cache = delivery.cache_status
    fields = {
        "remote": request.remote or "-",
        "method": request.method,
        "path": request.rel_url.raw_path,
        "status": status,
        "bytes": sent,
        "completed": completed,
        "request_id": request_id,
        "duration": round(duration, 4),
        "cache": cache,
    }
    logger.info(
        "remote=%s method=%s path=%s status=%d bytes=%d completed=%s request_id=%s"
        " duration=%.4f cache=%s",
        escape(fields["remote"]),
        escape(fields["method"]),
        escape(fields["path"]),
        status,
        sent,
        "yes" if completed else "no",
        escape(request_id),
        duration,
        # Ours, never a caller's: quoted because it holds spaces, escaped anyway.
        f'"{escape(cache)}"' if cache else "-",
        extra={"escaped": True, "access": fields},
    )


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the request id header, and what the response announces."""
    delivery = delivery_of(request)
    if delivery is None:  # a request that never reached the app's middlewares
        delivery = Delivery(new_request_id())
        request[DELIVERY] = delivery
    relayed = response.headers.get(REQUEST_ID_HEADER)
    if relayed:
        delivery.request_id = relayed
    else:
        response.headers[REQUEST_ID_HEADER] = delivery.request_id
    if delivery.status is not None:
        return  # a second response after the first failed: the first one is what was sent
    delivery.status = response.status
    delivery.cache_status = response.headers.get(CACHE_STATUS)
    delivery.declared = response.content_length
    delivery.head_only = request.method == "HEAD" or response.status in (204, 304)
    writer = request.writer
    writer.on_body_write = delivery.count
