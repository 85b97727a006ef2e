"""The hard size limit: room is made for an image *before* its fill starts.

Glance's ``image_cache_max_size`` is only a threshold for a pruner someone must
remember to run, so a burst of misses can fill the disk. Here every fill first
reserves its size (known from the origin's metadata) against the limit:

    committed bytes + bytes reserved by fills in flight + this image <= max size

and least recently used, unpinned images are evicted until that holds. A free
space watermark on the filesystem is kept the same way. When no room can be
made the fill streams through without caching (bypass reason ``no_space``).

Reservations are shared by every process on the cache directory (the workers
of a service, a CLI prefetch beside it) through a ledger of files in
``.locks/reserved/``, written under the cross-process ``capacity`` lock, so
two processes cannot both spend the same room. A reservation must be on disk
before that lock is let go: a fill's own file in ``incomplete/`` appears only
later, and shows only the bytes written so far, so counting those (as this
module did until a two-process soak overshot the limit, tests/test_soak.py)
lets other processes admit fills the limit has no room for.
An image of unknown size cannot be reserved: it is admitted, and the periodic
prune corrects any overshoot afterwards.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import itertools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagecache.cache import ImageCache
from imagecache.fill.locks import held_or_removed
from imagecache.layout import file_size

log = logging.getLogger(__name__)

# Per process, not per ledger: two ledgers of one process (two caches on one
# directory) must not pick the same ticket name.
_SERIALS = itertools.count()


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
    ticket: str = ""  # its file in the ledger (empty: nothing held)


class Ledger:
    """Every process's reservations on one cache directory: a file each in ``directory``.

    A file is named ``<size>.<pid>.<serial>.<image_id>`` (image ids may hold
    dots, sizes and pids cannot, so the split is unambiguous) and stays locked
    (``flock``) by its owner for as long as the reservation lasts, so what a
    crashed process held is recognisable: its file's lock is free, and the next
    reader deletes it. Names carry everything, so reading the ledger is one
    directory listing and a lock probe per fill in flight. Callers hold the
    ``capacity`` lock around ``add`` and ``entries``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: dict[str, int] = {}  # ticket -> the descriptor holding its lock
        self._lock = threading.Lock()

    def add(self, image_id: str, size: int) -> str:
        """Record ``size`` bytes held for ``image_id``; returns the ticket for ``remove``."""
        ticket = f"{size}.{os.getpid()}.{next(_SERIALS)}.{image_id}"
        fd = os.open(
            self.directory / ticket, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else has it
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.directory / ticket)
            raise
        with self._lock:
            self._held[ticket] = fd
        return ticket

    def held_bytes(self) -> int:
        """Bytes this process's reservations hold (their sizes lead their names)."""
        with self._lock:
            return sum(int(ticket.partition(".")[0]) for ticket in self._held)

    def count(self) -> int:
        """How many reservations this process holds (each is a file and a descriptor)."""
        with self._lock:
            return len(self._held)

    def remove(self, ticket: str) -> None:
        with self._lock:
            fd = self._held.pop(ticket, None)
        if fd is None:
            return
        try:
            # Unlinked before the lock goes, so no reader takes it for a dead one.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / ticket)
        finally:
            os.close(fd)

    def entries(self) -> dict[str, int]:
        """Bytes held per image id by live reservations (the largest, if several)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        held: dict[str, int] = {}
        for name in names:
            size_text, _, rest = name.partition(".")
            image_id = rest.split(".", 2)[-1] if rest.count(".") >= 2 else ""
            if not size_text.isdigit() or not image_id:
                continue  # not a ticket of ours
            if not self._is_live(name):
                continue
            held[image_id] = max(held.get(image_id, 0), int(size_text))
        return held

    def _is_live(self, ticket: str) -> bool:
        with self._lock:
            if ticket in self._held:
                return True
        # A ticket that is not there was released meanwhile.
        return held_or_removed(
            self.directory / ticket,
            on_stale=lambda: log.info(
                "dropping reservation %s: the process that made it is gone", ticket
            ),
        )


class Capacity:
    """Admission control for fills of one cache; one instance per process."""

    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache
        self.ledger = Ledger(cache.layout.reservation_dir)
        self.evictions = 0

    @property
    def limit(self) -> int:
        return self.cache.max_size

    def reserved_bytes(self) -> int:
        """Bytes held by this process's reservations (the service's metric)."""
        return self.ledger.held_bytes()

    def reserve(self, image_id: str, size: int | None) -> Reservation:
        """Hold room for ``size`` bytes of ``image_id``, evicting LRU entries if needed.

        Blocking (metadata queries, unlinks): call it from a worker thread.
        """
        if self.cache.too_large(size):
            return Reservation(image_id, 0, Admission.TOO_LARGE)
        if size is None:
            return Reservation(image_id, 0, Admission.ADMITTED)
        # The cross-process lock serialises this process's threads too: each
        # call opens the lock file anew, and flock locks are per open file.
        with self.cache.exclusive("capacity"):
            pending, reserved = self._in_flight()
            shortfall = self._shortfall(image_id, size, pending, reserved)
            evicted: list[str] = []
            if shortfall > 0:
                candidates = [e for e in self.cache.iter_lru() if e[0] not in pending]
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
                    if self.cache.delete_cached_image(victim):
                        evicted.append(victim)
                        self.evictions += 1
                    freed += victim_size
            try:
                ticket = self.ledger.add(image_id, size)
            except OSError as exc:
                # Without a ledger entry other processes could spend this room too.
                log.warning("cannot reserve room for image %s: %s; streaming only", image_id, exc)
                return Reservation(image_id, 0, Admission.NO_SPACE, tuple(evicted))
        if evicted:
            log.info("evicted %d images to make room for %s", len(evicted), image_id)
        return Reservation(image_id, size, Admission.ADMITTED, tuple(evicted), ticket)

    def release(self, reservation: Reservation) -> None:
        """Give back what ``reservation`` holds; safe to call twice.

        Keyed by the ticket, never by the size: a fill announced as 0 bytes
        holds a ledger file and its descriptor like any other, and skipping it
        here once leaked one of each per request until the process ended.
        """
        if reservation.ticket:
            self.ledger.remove(reservation.ticket)

    @contextlib.contextmanager
    def reserved(self, image_id: str, size: int | None) -> Iterator[Reservation]:
        """``reserve`` for the duration of a ``with`` block."""
        reservation = self.reserve(image_id, size)
        try:
            yield reservation
        finally:
            self.release(reservation)

    # --- accounting (caller holds the capacity lock) ---------------------------------------

    def _in_flight(self) -> tuple[dict[str, int], dict[str, int]]:
        """(bytes each fill in flight will occupy, bytes each has reserved), by image id.

        One read of the ledger and of ``incomplete/``. A fill is counted at its
        reservation, or for one that reserved nothing (size unknown, or a
        writer without a Capacity) at its file so far.
        """
        layout = self.cache.layout
        reserved = self.ledger.entries()
        pending = dict(reserved)
        for entry in layout.iter_images(layout.incomplete_dir):
            on_disk = file_size(layout.incomplete_dir / entry.name) or 0
            pending[entry.name] = max(pending.get(entry.name, 0), on_disk)
        return pending, reserved

    def _shortfall(
        self, image_id: str, size: int, pending: dict[str, int], reserved: dict[str, int]
    ) -> int:
        """Bytes to free before ``size`` more fits under the limit and above the watermark.

        ``pending`` and ``reserved`` come from ``_in_flight``, read before the
        committed total is: a fill commits its metadata, then releases its
        reservation, so read in that order it is counted at least once (twice,
        harmlessly, in between). The other order misses a fill that commits
        and releases between the two reads. ``image_id`` itself is counted
        once, as the ``size`` asked for.
        """
        in_flight = sum(n for other, n in pending.items() if other != image_id)
        still_to_write = sum(n for other, n in reserved.items() if other != image_id)
        committed = self.cache.get_cache_size()
        over_limit = committed + in_flight + size - self.limit
        under_watermark = 0
        watermark = self.cache.free_space_watermark
        if watermark:
            st = os.statvfs(self.cache.layout.base)
            free = st.f_bavail * st.f_frsize
            # Fills in flight will still take what they have not written yet;
            # counting their full size errs on the safe side.
            under_watermark = watermark - (free - still_to_write - size)
        return max(over_limit, under_watermark, 0)
