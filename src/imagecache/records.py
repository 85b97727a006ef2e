"""Values that cross module boundaries: frozen dataclasses and enums, no behaviour."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

# Multihash algorithms we verify, strongest first. Glance's os_hash_algo
# defaults to sha512; md5 is Glance's legacy ``checksum``.
HASH_ALGORITHMS = ("sha512", "sha384", "sha256", "sha1", "md5")

# A piece of an image on its way through a fill: bytes from an async upstream,
# a view of a reused buffer from a blocking one.
Chunk = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class CachedImage:
    """One committed image, as the listing APIs show it.

    Times are epoch seconds (UTC). ``last_accessed`` equals ``last_modified``
    until the first read; ``hits`` counts completed reads from the cache.
    """

    image_id: str
    size: int
    hits: int
    last_accessed: float
    last_modified: float
    checksum: str | None = None
    hash_algo: str | None = None
    hash_value: str | None = None
    pinned: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The shape of Glance's ``cached_images`` entries, plus our extra fields."""
        return {
            "image_id": self.image_id,
            "hits": self.hits,
            "last_accessed": self.last_accessed,
            "last_modified": self.last_modified,
            "size": self.size,
            "checksum": self.checksum,
            "os_hash_algo": self.hash_algo,
            "os_hash_value": self.hash_value,
            "pinned": self.pinned,
        }


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the origin promises about an image's bytes; every field may be unknown."""

    image_id: str
    size: int | None = None
    checksum: str | None = None  # md5 hex, Glance's legacy field
    hash_algo: str | None = None  # Glance's os_hash_algo
    hash_value: str | None = None  # Glance's os_hash_value
    status: str = "active"

    @property
    def verifiable(self) -> bool:
        return bool(self.checksum) or bool(self.hash_algo and self.hash_value)


class QueueResult(enum.Enum):
    """Outcome of ``queue_image``; truthy only when the image was queued now.

    The seed returns a bare bool; the enum says *why* nothing was queued while
    staying usable wherever a bool was expected.
    """

    QUEUED = "queued"
    ALREADY_CACHED = "already_cached"
    BEING_CACHED = "being_cached"
    ALREADY_QUEUED = "already_queued"

    def __bool__(self) -> bool:
        return self is QueueResult.QUEUED


class PruneResult(NamedTuple):
    """What ``prune()`` evicted; unpacks as Glance's ``(files, bytes)`` tuple."""

    files: int
    bytes: int


class CleanResult(NamedTuple):
    """What ``clean()`` removed from ``invalid/`` and ``incomplete/``."""

    invalid: int
    stalled: int
