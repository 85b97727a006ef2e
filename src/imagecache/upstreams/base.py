"""The upstream protocol: where images come from on a miss.

An upstream answers two questions about an image: what it promises about the
bytes (``info``) and the bytes themselves (``stream``), optionally a range.
Kinds: ``directory`` (local files), ``http`` (a URL template), ``s3`` (a bucket)
and ``glance`` (a Glance v2 API, with the caller's identity passed through).

Errors are translated here, at the boundary: an upstream raises only
``UpstreamNotFound``, ``UpstreamForbidden``, ``UpstreamNotActive`` or another
``UpstreamError``, never the client library's own exceptions.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from imagecache.records import ImageInfo

# Headers that identify a caller to a Glance origin; passed through verbatim and
# never logged.
IDENTITY_HEADERS = (
    "X-Auth-Token",
    "X-Identity-Status",
    "X-Roles",
    "X-User-Id",
    "X-Project-Id",
    "X-Tenant-Id",
    "X-Domain-Id",
)


@dataclass(frozen=True)
class Caller:
    """Who asks: the identity headers to present to the origin (may be empty).

    ``service`` marks the cache's own requests (queued and periodic fetches,
    prefetch, scrub): an origin that knows the cache's own identity (a Glance
    upstream with a Keystone account) presents that instead of any headers.
    """

    headers: Mapping[str, str] = field(default_factory=dict)
    service: bool = False

    @property
    def anonymous(self) -> bool:
        return not self.headers and not self.service

    def cache_key(self) -> str:
        """A stable key for remembering this caller's access decisions."""
        if self.service:
            return "service"
        return "\n".join(f"{k.lower()}={v}" for k, v in sorted(self.headers.items()))


ANONYMOUS = Caller()
# The cache itself, acting for nobody in particular.
SERVICE = Caller(service=True)


class BlockingSource(Protocol):
    """An image's bytes read with blocking calls, for a fill that runs in one thread.

    ``readinto`` fills a buffer and returns the count (0 at the end); it raises
    only ``UpstreamError``. ``close`` releases what the source holds.
    ``interrupt`` may be called from another thread: a ``readinto`` waiting on
    the origin then ends with ``UpstreamError`` instead of waiting out its
    timeout (a fill cancelled at shutdown).

    ``copy_into`` is the fast path of a source that can move its next bytes
    into a file in the kernel (``copy_file_range``), without a trip through a
    buffer of ours: it returns the count copied to ``fd``'s position (0 at the
    end), or None if this source cannot, and the fill then uses ``readinto``
    for the rest. Its ``OSError`` may come from either file; the fill then
    falls back to ``readinto`` too, whose own errors tell the two apart.
    """

    def readinto(self, buffer: memoryview, /) -> int: ...

    def copy_into(self, fd: int, count: int, /) -> int | None: ...

    def interrupt(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Releasable(Protocol):
    """A ``BlockingSource`` that can close its connection mid-body and reopen it when read again.

    ``release`` returns whether a connection was closed (fill/pump.py calls
    it for a paused background fill, from the thread that reads).
    """

    def release(self) -> bool: ...


class Upstream(abc.ABC):
    """One image origin."""

    kind: str = "base"
    # Whether ``info`` answers differently depending on who asks (Glance: a
    # private image is 404 to other projects); metadata.py shares less then.
    caller_dependent: bool = False

    @abc.abstractmethod
    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        """What the origin promises about the image; raises UpstreamNotFound etc."""

    @abc.abstractmethod
    def stream(
        self,
        image_id: str,
        caller: Caller = ANONYMOUS,
        start: int = 0,
        end: int | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """The image's bytes ``[start, end)`` (``end=None``: to the end), as they arrive.

        An async generator: the caller closes it (``aclose``) when done, which
        releases the connection. A failure mid-stream raises ``UpstreamError``.
        """

    async def open_source(self, image_id: str, caller: Caller = ANONYMOUS) -> BlockingSource | None:
        """The whole image as a ``BlockingSource``, or None to be read with ``stream``.

        Upstreams whose reads are cheap blocking calls (local files) offer one:
        a fill then reads, writes and hands bytes to its hash thread in one
        thread, without a trip through the event loop per chunk.
        """
        return None

    async def check_access(self, image_id: str, caller: Caller) -> None:
        """Raise UpstreamForbidden/UpstreamNotFound unless ``caller`` may download the image.

        Origins without callers (directory, http, s3) allow everyone the
        service lets in; the glance upstream asks Glance.
        """
        return None

    async def check_reachable(self) -> str:
        """Whether the origin answers at all (for the readiness route); raises UpstreamError.

        Returns what was checked, in words. Not a question about any image:
        an origin that answers with an error status for its root still answers.
        """
        return f"{self.kind} origin: no check"

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions and pools."""


def describe_failure(exc: BaseException) -> str:
    """What went wrong talking to an origin, in words (for 502 bodies and logs).

    ``repr`` of a client library's exception (``ClientConnectorError(
    ConnectionKey(host=..., ...))``) tells an operator little and a client
    less; this names the address and the error instead.
    """
    # Imported here: the directory and s3 upstreams need no aiohttp, and this
    # module is the protocol every upstream imports.
    import aiohttp

    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error) or "refused"
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the response body was cut off (incomplete payload)"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status} {exc.message}".rstrip()
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout (upstream_timeout)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text if text else type(exc).__name__
