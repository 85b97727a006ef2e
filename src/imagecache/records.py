"""Values that cross module boundaries: frozen dataclasses and enums, no behaviour.

Besides the cache's own records, the reports of the management verbs live here
(adopt, prefetch, scrub, the cluster listing): they cross the REST boundary, so
the remote CLI's client (client.py) builds them from JSON without importing the
engine that produces them locally. This module imports nothing of imagecache
and no third-party package (tests/test_architecture.py checks what
``import imagecache.client`` loads).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
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


# --- reports of the management verbs (local and over REST) ----------------------------

# progress(item, advance): ``advance`` is in the unit the total was given in.
Progress = Callable[[str, int], None]


class AdoptOutcome(enum.Enum):
    ADOPTED = "adopted"
    ALREADY_CACHED = "already_cached"
    SKIPPED = "skipped"  # not an image we can take (bad name, empty, unreadable)


@dataclass
class AdoptReport:
    outcomes: dict[str, AdoptOutcome] = field(default_factory=dict)
    bytes: int = 0
    queued: int = 0
    metadata_source: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return {
            "metadata_source": self.metadata_source,
            "bytes": self.bytes,
            "queued": self.queued,
            "images": {i: o.value for i, o in self.outcomes.items()},
        }


class PrefetchOutcome(enum.Enum):
    """What one queued image's prefetch came to."""

    CACHED = "cached"
    ALREADY_CACHED = "already_cached"
    BEING_CACHED = "being_cached"
    NOT_CACHEABLE = "not_cacheable"
    FAILED = "failed"

    @property
    def ok(self) -> bool:
        return self is not PrefetchOutcome.FAILED and self is not PrefetchOutcome.NOT_CACHEABLE


@dataclass(frozen=True, slots=True)
class QueuedImage:
    """A queue entry as the listings show it: Glance's id plus when and why it last failed."""

    image_id: str
    queued_at: float
    error: str | None = None
    attempts: int = 0
    failed_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_id": self.image_id,
            "queued_at": self.queued_at,
            "error": self.error,
            "attempts": self.attempts,
            "failed_at": self.failed_at,
        }


@dataclass
class PrefetchReport:
    """Outcome per image of one prefetch run."""

    outcomes: dict[str, PrefetchOutcome] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(outcome.ok for outcome in self.outcomes.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "images": {
                image_id: {"outcome": outcome.value, "error": self.errors.get(image_id)}
                for image_id, outcome in self.outcomes.items()
            },
        }


class ScrubOutcome(enum.Enum):
    OK = "ok"
    CORRUPT = "corrupt"  # hash mismatch: quarantined
    NO_HASH = "no_hash"  # nothing recorded to compare with (and none could be recorded)
    # Nothing was recorded (adopted after a crash, or the database was rebuilt):
    # the file's sha256 is recorded now, so later scrubs and the ETag have one.
    HASHED = "hashed"
    MISSING = "missing"  # deleted meanwhile

    @property
    def ok(self) -> bool:
        return self is not ScrubOutcome.CORRUPT


@dataclass
class ScrubReport:
    outcomes: dict[str, ScrubOutcome] = field(default_factory=dict)
    bytes_read: int = 0

    @property
    def corrupt(self) -> list[str]:
        return [i for i, o in self.outcomes.items() if o is ScrubOutcome.CORRUPT]

    @property
    def ok(self) -> bool:
        return not self.corrupt

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bytes_read": self.bytes_read,
            "corrupt": self.corrupt,
            "images": {i: o.value for i, o in self.outcomes.items()},
        }


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One registered node, as ``list_nodes`` shows it."""

    url: str
    heartbeat: float
    started: float
    alive: bool
    site: str = ""


@dataclass(frozen=True, slots=True)
class NodeListing:
    """One node of ``cluster_listing``: its state and the copies it is offered with."""

    node: NodeInfo
    images: list[CachedImage]

    def as_dict(self) -> dict[str, Any]:
        return {
            "alive": self.node.alive,
            "site": self.node.site,
            "heartbeat": self.node.heartbeat,
            "started": self.node.started,
            "cached_images": [image.as_dict() for image in self.images],
        }
