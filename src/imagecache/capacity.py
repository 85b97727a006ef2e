"""The hard size limit: room is made for an image *before* its fill starts.

Glance's ``image_cache_max_size`` is only a threshold for a pruner someone must
remember to run, so a burst of misses can fill the disk. Here every fill first
reserves its size (known from the origin's metadata) against the limit:

    committed bytes + bytes reserved by fills in flight + this image <= max size

and least recently used, unpinned images are evicted until that holds. A free
space watermark on the filesystem is kept the same way. When no room can be
made the fill streams through without caching (bypass reason ``no_space``).

Reservations are per process, in memory; fills of *other* processes are seen
through their files in ``incomplete/``. The check-and-evict step runs under the
cross-process ``capacity`` lock, so two workers cannot both spend the same room.
An image of unknown size cannot be reserved: it is admitted, and the periodic
prune corrects any overshoot afterwards.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from imagecache.cache import ImageCache
from imagecache.layout import file_size

log = logging.getLogger(__name__)


class Admission(enum.Enum):
    """Whether a fill may write a cache copy, and if not, the bypass reason."""

    ADMITTED = "admitted"
    TOO_LARGE = "too_large"
    NO_SPACE = "no_space"

    def __bool__(self) -> bool:
        return self is Admission.ADMITTED


@dataclass(frozen=True, slots=True)
class Reservation:
    """Room held for one fill; release it when the fill has committed or rolled back."""

    image_id: str
    size: int
    admission: Admission
    evicted: tuple[str, ...] = ()


class Capacity:
    """Admission control for fills of one cache; one instance per process."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache
        self._reserved: dict[str, int] = {}
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def limit(self) -> int:
        return self.cache.settings.image_cache_max_size

    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(self._reserved.values())

    def reserve(self, image_id: str, size: int | None) -> Reservation:
        """Hold room for ``size`` bytes of ``image_id``, evicting LRU entries if needed.

        Blocking (metadata queries, unlinks): call it from a worker thread.
        """
        settings = self.cache.settings
        if size is not None and size > settings.largest_cacheable_image:
            return Reservation(image_id, 0, Admission.TOO_LARGE)
        if size is None:
            return Reservation(image_id, 0, Admission.ADMITTED)
        with self.cache.exclusive("capacity"), self._lock:
            shortfall = self._shortfall(size)
            evicted: list[str] = []
            if shortfall > 0:
                in_flight = self._in_flight_ids()
                candidates = [e for e in self.cache.driver.iter_lru() if e[0] not in in_flight]
                # Evict only when it can succeed: a disk filled by something else
                # must not cost us the whole cache and still end in a bypass.
                if sum(entry_size for _, entry_size in candidates) < shortfall:
                    log.warning(
                        "no room for image %s (%d bytes): %d bytes short; streaming only",
                        image_id,
                        size,
                        shortfall,
                    )
                    return Reservation(image_id, 0, Admission.NO_SPACE)
                freed = 0
                for victim, victim_size in candidates:
                    if freed >= shortfall:
                        break
                    if self.cache.driver.delete_cached_image(victim):
                        evicted.append(victim)
                        self.evictions += 1
                    freed += victim_size
            self._reserved[image_id] = self._reserved.get(image_id, 0) + size
        if evicted:
            log.info("evicted %d images to make room for %s", len(evicted), image_id)
        return Reservation(image_id, size, Admission.ADMITTED, tuple(evicted))

    def release(self, reservation: Reservation) -> None:
        if not reservation.size:
            return
        with self._lock:
            left = self._reserved.get(reservation.image_id, 0) - reservation.size
            if left > 0:
                self._reserved[reservation.image_id] = left
            else:
                self._reserved.pop(reservation.image_id, None)

    @contextlib.contextmanager
    def reserved(self, image_id: str, size: int | None) -> Iterator[Reservation]:
        """``reserve`` for the duration of a ``with`` block."""
        reservation = self.reserve(image_id, size)
        try:
            yield reservation
        finally:
            self.release(reservation)

    # --- accounting (caller holds both locks) ----------------------------------------------

    def _in_flight_ids(self) -> set[str]:
        layout = self.cache.driver.layout
        ids = {entry.name for entry in layout.iter_images(layout.incomplete_dir)}
        return ids | set(self._reserved)

    def _pending_bytes(self) -> int:
        """Bytes fills in flight will occupy: our reservations, others' files so far."""
        layout = self.cache.driver.layout
        pending = dict(self._reserved)
        for entry in layout.iter_images(layout.incomplete_dir):
            on_disk = file_size(layout.incomplete_dir / entry.name) or 0
            pending[entry.name] = max(pending.get(entry.name, 0), on_disk)
        return sum(pending.values())

    def _shortfall(self, size: int) -> int:
        """Bytes to free before ``size`` more fits under the limit and above the watermark."""
        committed = self.cache.driver.get_cache_size()
        over_limit = committed + self._pending_bytes() + size - self.limit
        under_watermark = 0
        watermark = self.cache.settings.free_space_watermark
        if watermark:
            st = os.statvfs(self.cache.driver.layout.base)
            free = st.f_bavail * st.f_frsize
            # Our fills in flight will still take what they have not written yet;
            # counting their full size errs on the safe side.
            still_to_write = sum(self._reserved.values())
            under_watermark = watermark - (free - still_to_write - size)
        return max(over_limit, under_watermark, 0)
