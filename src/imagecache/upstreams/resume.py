"""Resuming an image body whose connection broke, without ever splicing two versions.

When the origin's connection fails mid-body (a reset, a read timeout, a body
shorter than its length), the body is asked for again from the first byte not
yet received, with a ``Range`` request, at most ``upstream_resume_attempts``
times per body, the first at once, each further one after ``upstream_resume_backoff``
seconds (doubling, capped at ``BACKOFF_CAP``). The consumer (a fill's hash, a
client's stream) sees one continuous body; only when the attempts run out does
it get the error it would have got without resuming.

A resume is only worth having if the bytes after the break belong to the same
image as the bytes before it. So the first response's identity is kept
(``Validator``) and every resumed one is checked against it:

- the request carries ``If-Range`` with the first response's strong ETag, or
  its ``Last-Modified`` if it had no strong ETag (RFC 9110 §13.1.5): an origin
  whose image changed answers 200 with the whole new image, which is refused;
  S3 takes ``IfMatch`` instead and answers 412;
- the answer must be ``206`` with a ``Content-Range`` starting at the byte
  asked for, ending where the body should, and of the same total length;
- its ETag must be the first one (RFC 9110 §15.3.7: a 206 carries the ETag a
  200 would), and each checksum or version header both responses carry
  (``Content-MD5``, ``Digest``, ``x-amz-meta-sha256``, ...) must be equal.

Anything else raises ``ResumeRefused``: the body fails, so the fill fails and
nothing is cached. A first response with nothing that identifies its version
(no ETag, Last-Modified or checksum header) is not resumed at all, nor one
without a length (chunked) unless a strong ETag or a hash of the whole image
names it. Glance sends its whole-image downloads chunked, with no ETag, but
sends the image's md5 as ``Content-MD5`` on every download, ranged or not, and
never changes an active image's data; the fill's verification against the
promised hashes stays the last word either way.

Decisions, for an operator: the attempts bound a body's resumes in total, not
per stall, so a flapping origin cannot keep a fill (and its clients) going for
ever; the first request is not retried here (failing to connect at all is
today's error, raised at once); a 5xx or a failed connection on a resume uses
up an attempt and is retried, any other answer is a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field

from imagecache.errors import ResumeRefused, UpstreamError, UpstreamUnreachable, is_origin_failure
from imagecache.upstreams.config import UpstreamConfig
from imagecache.upstreams.resume_events import NO_RESUME_EVENTS, ResumeEvents

log = logging.getLogger(__name__)

# The longest wait before one resume: past this, doubling only delays a fill
# whose clients are waiting.
BACKOFF_CAP = 30.0
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+)$")
# Headers that identify the whole image's version, compared on every resume
# when both responses carry them. Not Content-Digest or Content-Length: those
# describe one response's body, which a range changes.
_IDENTIFYING = (
    "content-md5",
    "x-image-meta-checksum",
    "repr-digest",
    "digest",
    "last-modified",
    "x-amz-version-id",
    "x-amz-meta-sha512",
    "x-amz-meta-sha256",
    "x-amz-meta-checksum",
    "x-amz-meta-md5",
)
# Those of them that hash the whole image's bytes.
_HASHES = frozenset(_IDENTIFYING) - {"last-modified", "x-amz-version-id"}


@dataclass(frozen=True)
class ResumePolicy:
    """How often and how patiently a broken body is resumed (``attempts=0``: never)."""

    attempts: int
    backoff: float
    events: ResumeEvents = field(default=NO_RESUME_EVENTS, compare=False)  # hears each outcome

    @classmethod
    def of(cls, config: UpstreamConfig, events: ResumeEvents = NO_RESUME_EVENTS) -> ResumePolicy:
        return cls(config.upstream_resume_attempts, config.upstream_resume_backoff, events)

    def delay(self, attempt: int) -> float:
        """Seconds before resume ``attempt`` (1-based); none before the first: after one WAN
        reset a wait only idles the link (on the WAN rig, most of what a reset cost)."""
        return 0.0 if attempt <= 1 else min(BACKOFF_CAP, self.backoff * 2.0 ** (attempt - 2))


@dataclass(frozen=True)
class Validator:
    """What the first response said about the image, for checking every resumed one."""

    image_id: str
    total: int | None  # None: a chunked 200 (Glance's whole-image download)
    end: int | None  # one past the last byte the body should deliver; None: to the end
    etag: str | None  # strong only: a weak one cannot go into If-Range
    last_modified: str | None
    etag_sent: str | None  # the ETag header as sent, weak or strong
    identifying: tuple[tuple[str, str], ...]

    @classmethod
    def of(
        cls, image_id: str, status: int, headers: Mapping[str, str], end: int | None
    ) -> Validator | None:
        """The identity of a first response, or None if it cannot be resumed safely."""
        found = _lower(headers)
        if found.get("content-encoding", "identity").lower() != "identity":
            return None  # a re-encoded body's offsets are not the image's
        total: int | None = None
        if status == 206:
            match = _CONTENT_RANGE.match(found.get("content-range", "").strip())
            total = int(match.group(3)) if match else None
        elif status == 200 and "chunked" not in found.get("transfer-encoding", "").lower():
            length = found.get("content-length", "")
            total = int(length) if length.isdigit() else None
        elif status != 200:
            return None
        etag_sent = found.get("etag")
        etag = etag_sent if etag_sent and not etag_sent.startswith("W/") else None
        identifying = tuple((name, found[name]) for name in _IDENTIFYING if name in found)
        if etag_sent is None and not identifying:
            return None  # nothing would tell a changed image from this one
        if total is None and etag is None and not any(n in _HASHES for n, _ in identifying):
            # No length to compare either: only a strong ETag or a hash of the
            # whole image names the bytes; a date does not.
            return None
        return cls(
            image_id=image_id,
            total=total,
            end=end if total is None else total if end is None else min(end, total),
            etag=etag,
            last_modified=found.get("last-modified"),
            etag_sent=etag_sent,
            identifying=identifying,
        )

    def range_value(self, offset: int) -> str:
        return f"bytes={offset}-{'' if self.end is None else self.end - 1}"

    def done(self, offset: int) -> bool:
        """Whether ``offset`` is past the last byte wanted (nothing left to resume)."""
        return self.end is not None and offset >= self.end

    def http_headers(self, offset: int) -> dict[str, str]:
        """``Range`` and, when there is a validator to put in it, ``If-Range``."""
        headers = {"Range": self.range_value(offset)}
        if_range = self.etag or self.last_modified
        if if_range:
            headers["If-Range"] = if_range
        return headers

    def check(self, status: int, headers: Mapping[str, str], offset: int) -> None:
        """Raise unless the answer to a resume at ``offset`` continues the same image.

        A 5xx raises ``UpstreamUnreachable`` (worth another attempt); anything
        else that does not fit raises ``ResumeRefused``.
        """
        image_id = self.image_id
        if status >= 500:
            raise UpstreamUnreachable(
                f"image {image_id!r}: the origin answered HTTP {status}"
                f" to a resume at byte {offset}"
            )
        if status != 206:
            why = "the image changed, or Range is not supported" if status == 200 else "no range"
            raise ResumeRefused(image_id, offset, f"the origin answered HTTP {status} ({why})")
        found = _lower(headers)
        content_range = found.get("content-range", "")
        match = _CONTENT_RANGE.match(content_range.strip())
        if match is None:
            raise ResumeRefused(image_id, offset, f"Content-Range {content_range!r} is not usable")
        first, last, total = (int(group) for group in match.groups())
        if self.total is not None and total != self.total:
            raise ResumeRefused(
                image_id, offset, f"the image is now {total} bytes, it was {self.total}"
            )
        wanted = (total if self.end is None else self.end) - 1
        if first != offset or last != wanted:
            raise ResumeRefused(
                image_id, offset, f"it sent bytes {first}-{last}, not {offset}-{wanted}"
            )
        if self.etag_sent is not None and found.get("etag") != self.etag_sent:
            raise ResumeRefused(
                image_id, offset, f"ETag {found.get('etag')!r} is not {self.etag_sent!r}"
            )
        for name, value in self.identifying:
            now = found.get(name)
            if now is not None and now != value:
                raise ResumeRefused(image_id, offset, f"{name} {now!r} is not {value!r}")


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def retryable(exc: UpstreamError) -> bool:
    # Not found, forbidden, not active, refused: answers, which another try
    # would only repeat.
    return is_origin_failure(exc) and not isinstance(exc, ResumeRefused)


def log_resume(
    image_id: str, offset: int, attempt: int, policy: ResumePolicy, exc: Exception
) -> None:
    # Arguments, not an f-string: the service's handlers escape every argument
    # (logsafe.EscapingFilter), as for every other log call of the library.
    log.warning(
        "resuming the upstream body of %s at byte %d (attempt %d of %d): %s",
        image_id,
        offset,
        attempt,
        policy.attempts,
        exc,
    )


@dataclass(frozen=True)
class Reply:
    """One answer of the origin: its status, headers and body (an async iterator)."""

    status: int
    headers: Mapping[str, str]
    body: AsyncIterator[bytes]


# ``open_part(offset, None)`` sends the first request (for ``[start, end)``)
# and translates its error statuses; ``open_part(offset, validator)`` a resume
# (with the validator's headers), returning whatever status the origin gave.
AsyncOpener = Callable[[int, "Validator | None"], AbstractAsyncContextManager[Reply]]


class Release:
    """A handle on one resumable stream's origin connection, for a paused background fill.

    ``resumable_stream`` finds it in ``RELEASE`` when its first chunk is asked
    for (``releasable`` sets it around a fill's reads: fill/pump.py). While
    ``open``, the stream is suspended mid-body on a live connection; the
    consumer then sets ``wanted`` and reads once more (``pump.release_stream``):
    the stream closes its connection and yields an empty chunk, and the read
    after that reopens it at the first byte not yet received, with the same
    Range, validator and checks as a resume after a break, none of its
    attempts used (only a failure of the reopen uses one). The blocking twin
    is ``ResumingSource.release`` (resume_source.py).
    """

    def __init__(self) -> None:
        self.open = False
        self.wanted = False


# A context variable, not an argument of ``Upstream.stream``: the stream is
# built by layers (the upstream, its HTTP client, this module) that need not
# know of it, and an async generator runs in the context of whoever reads it.
RELEASE: ContextVar[Release | None] = ContextVar("imagecache_release", default=None)


@contextlib.contextmanager
def releasable() -> Iterator[Release]:
    """A ``Release`` for the resumable stream first read inside the block."""
    handle = Release()
    token = RELEASE.set(handle)
    try:
        yield handle
    finally:
        RELEASE.reset(token)


async def resumable_stream(
    image_id: str,
    policy: ResumePolicy,
    open_part: AsyncOpener,
    start: int,
    end: int | None,
) -> AsyncGenerator[bytes, None]:
    """The body ``[start, end)`` as one stream, resumed across broken or released connections."""
    offset = start
    validator: Validator | None = None
    attempt = 0
    events = policy.events
    release = RELEASE.get()
    reopening = False  # the next answer follows a release, not a break
    while True:
        released = False
        try:
            async with open_part(offset, validator) as reply:
                if validator is None:
                    validator = Validator.of(image_id, reply.status, reply.headers, end)
                    if validator is None or policy.attempts == 0:
                        # Not resumable: read it exactly as without this module.
                        async for chunk in reply.body:
                            yield chunk
                        return
                else:
                    validator.check(reply.status, reply.headers, offset)
                    if not reopening:
                        events.resume_outcome("resumed")
                reopening = False
                async for chunk in reply.body:
                    offset += len(chunk)
                    if release is not None:
                        release.open = not validator.done(offset)
                    yield chunk
                    if release is not None and release.wanted:
                        released = True
                        break  # leaving the block closes the connection
            if not released:
                return
        except UpstreamError as exc:
            reopening = False
            if release is not None:
                release.open = False
            if validator is None:
                raise
            if isinstance(exc, ResumeRefused):  # only a resume's answer is refused
                events.resume_outcome("refused")
            if not retryable(exc) or validator.done(offset):
                raise  # every byte is here; a failure after them is not a break
            if attempt >= policy.attempts:
                if policy.attempts:
                    events.resume_outcome("exhausted")
                raise
            attempt += 1
            log_resume(image_id, offset, attempt, policy, exc)
            await asyncio.sleep(policy.delay(attempt))
            continue
        assert release is not None  # released: the connection is closed
        release.open = release.wanted = False
        reopening = True
        # Hands control back to the consumer's release; its next read reopens.
        yield b""
