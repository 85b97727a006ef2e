"""Integrity at rest: re-hash cached files against the hash recorded at fill time.

Bits rot, disks lie and operators copy files by hand. Every entry records the
hash its fill was verified with (the origin's multihash, else Glance's md5
``checksum``, else the sha256 we computed); the scrub re-reads each file at a
limited rate (``scrub_bytes_per_second``, so it never starves serving) and
quarantines a mismatch: the file moves to ``invalid/`` for inspection and its
metadata is dropped, so the next request fills it again from the origin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable

from imagecache.cache import ImageCache
from imagecache.errors import ImageCacheError
from imagecache.fill.hashing import strongest_hash
from imagecache.fill.writer import CHUNK_SIZE
from imagecache.records import CachedImage, ScrubOutcome, ScrubReport

log = logging.getLogger(__name__)


def recorded_digest(image: CachedImage) -> tuple[str, str] | None:
    """The strongest ``(algorithm, hex value)`` recorded for an entry, or None."""
    return strongest_hash(image.checksum, image.hash_algo, image.hash_value)


class _Throttle:
    """Sleeps just enough to keep a reader under ``rate`` bytes per second (0 = unlimited)."""

    def __init__(self, rate: int, stop: threading.Event) -> None:
        self.rate = rate
        self.stop = stop
        self.started = time.monotonic()
        self.consumed = 0

    def spend(self, nbytes: int) -> None:
        self.consumed += nbytes
        if not self.rate:
            return
        ahead = self.consumed / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            self.stop.wait(ahead)  # wakes at once when the scrub is stopped


class Scrubber:
    """Re-verifies cached files; blocking, so the service runs it in a thread."""

    def __init__(self, cache: ImageCache, bytes_per_second: int) -> None:
        self.cache = cache
        self.rate = bytes_per_second  # scrub_bytes_per_second; 0: unthrottled
        self.stop_event = threading.Event()
        self.quarantined = 0

    def stop(self) -> None:
        self.stop_event.set()

    def verify(self, image_id: str, throttle: _Throttle | None = None) -> tuple[ScrubOutcome, int]:
        """Re-hash one entry; quarantine it if it does not match. Returns outcome and bytes."""
        image_id = self.cache.layout.accept(image_id)  # InvalidImageId for a bad id
        image = self.cache.get_cached_image(image_id)
        if image is None:
            return ScrubOutcome.MISSING, 0
        expected = recorded_digest(image)
        algo, value = expected if expected is not None else ("sha256", "")
        throttle = throttle or _Throttle(self.rate, self.stop_event)
        digest = hashlib.new(algo, usedforsecurity=False)
        read = 0
        # Read the file directly, not via open_for_read: a scrub is not a hit.
        # Never through a symlink either: a planted one is moved aside there.
        opened = self.cache.layout.open_committed(image_id)
        if opened is None:
            return ScrubOutcome.MISSING, read
        with opened as handle:
            while chunk := handle.read(CHUNK_SIZE):
                digest.update(chunk)
                read += len(chunk)
                throttle.spend(len(chunk))
                if self.stop_event.is_set():
                    return ScrubOutcome.MISSING, read
        if expected is None:
            return self._record_hash(image, read, digest.hexdigest()), read
        if digest.hexdigest() == value:
            return ScrubOutcome.OK, read
        self._quarantine(image_id, algo, value, digest.hexdigest())
        return ScrubOutcome.CORRUPT, read

    def run(
        self,
        image_ids: Iterable[str] | None = None,
        progress: Callable[[str, ScrubOutcome, int], None] | None = None,
    ) -> ScrubReport:
        """Verify ``image_ids`` (default: every cached image) under one rate limit."""
        ids = (
            list(image_ids)
            if image_ids is not None
            else [image.image_id for image in self.cache.get_cached_images()]
        )
        report = ScrubReport()
        throttle = _Throttle(self.rate, self.stop_event)
        for image_id in ids:
            if self.stop_event.is_set():
                break
            outcome, read = self.verify(image_id, throttle)
            report.outcomes[image_id] = outcome
            report.bytes_read += read
            if progress is not None:
                progress(image_id, outcome, read)
        return report

    def _record_hash(self, image: CachedImage, size: int, actual: str) -> ScrubOutcome:
        """Record the hash of an entry that had none (its bytes were verified at its fill).

        Files reach ``<dir>`` only verified (drivers/files.py); an entry
        without a hash lost it (a crash between rename and record, a database
        rebuilt from the files), not its verification. A file whose size is no
        longer its record's is not one of those: it is quarantined instead.
        """
        if size != image.size:
            self.cache.quarantine(
                image.image_id, f"its file has {size} bytes, its record {image.size}"
            )
            return ScrubOutcome.CORRUPT
        current = self.cache.get_cached_image(image.image_id)
        if current is None or recorded_digest(current) is not None:
            return ScrubOutcome.MISSING if current is None else ScrubOutcome.OK
        try:
            self.cache.record_image(
                dataclasses.replace(current, hash_algo="sha256", hash_value=actual), replace=True
            )
        except (NotImplementedError, ImageCacheError) as exc:
            log.warning("cannot record the hash of %s: %s", image.image_id, exc)
            return ScrubOutcome.NO_HASH
        log.info("recorded the sha256 of %s, which had no hash", image.image_id)
        return ScrubOutcome.HASHED

    def _quarantine(self, image_id: str, algo: str, expected: str, actual: str) -> None:
        self.cache.quarantine(
            image_id, f"{algo} expected {expected}, got {actual} (corrupt at rest)"
        )
        self.quarantined += 1
