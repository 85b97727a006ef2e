"""Parsing the ``Range`` request header (RFC 9110 §14), as a pure function.

Decisions, with the sections they rest on:

- Only the ``bytes`` unit is understood. A header with another unit is
  ignored and the whole image is served (§14.2: a server MUST ignore a range
  unit it does not understand).
- A syntactically invalid ``bytes=`` header is rejected with 400
  (``MalformedRange``). §14.2 lets a server "ignore or reject" an invalid
  ranges-specifier; rejecting tells the client what is wrong instead of
  silently sending gigabytes it did not ask for.
- More than one range is rejected with 400 too, as Glance does: a multipart
  ``multipart/byteranges`` body is of no use to image clients.
- A well-formed single range that selects no byte (first-byte-pos at or past
  the end, a zero suffix, any range of an empty image) is 416 with
  ``Content-Range: bytes */size`` (§14.1.1, §15.5.17; ``RangeNotSatisfiable``).
- A last-byte-pos past the end is clipped to the end (§14.1.2).

The two errors are the library's (``imagecache.errors``); the service's error
middleware gives them their statuses and the 416's ``Content-Range``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imagecache.errors import MalformedRange, RangeNotSatisfiable

# Absurdly long headers are malformed, not something to run regexes over.
_MAX_HEADER = 200
_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The bytes ``[start, end)`` of a representation of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range ``header`` selects in ``size`` bytes, or None for "the whole thing"."""
    if header is None:
        return None
    if len(header) > _MAX_HEADER:
        raise MalformedRange("Range header too long")
    unit, sep, spec = header.strip().partition("=")
    if not sep:
        raise MalformedRange("Range header must look like bytes=FIRST-LAST")
    if unit.strip().lower() != "bytes":
        return None  # §14.2: an unknown unit is ignored
    parts = [part.strip() for part in spec.split(",")]
    parts = [part for part in parts if part]  # §5.6.1: empty list elements are allowed
    if not parts:
        raise MalformedRange("Range header has no range")
    if len(parts) > 1:
        raise MalformedRange("multiple ranges are not supported; ask for one range")
    match = _SPEC_RE.fullmatch(parts[0])
    if match is None:
        raise MalformedRange(f"invalid byte range {parts[0]!r}")
    first, last = match.groups()
    if not first and not last:
        raise MalformedRange("a byte range needs a first or a last position")
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - suffix), size, size)
    start = int(first)
    if last:
        stop = int(last)
        if stop < start:
            raise MalformedRange(f"last position {stop} is before first position {start}")
        end = min(stop + 1, size)
    else:
        end = size
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, end, size)
