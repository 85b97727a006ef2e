"""One image's fill as seen by its followers: progress, the bytes to send next, the outcome.

A ``Flight`` is one image's fill in one process (``fill.coordinator`` keeps at
most one per image). Every request that downloads the image, the first one
included, reads the bytes from ``incomplete/<id>`` as they land, so a client
that disconnects never takes the fill down with it.

A flight is one of two kinds once decided:

- ``LOCAL``: this process won the ``O_EXCL`` + ``flock`` race and runs the fill
  in a background task (upstream → ``FillWriter`` → file). Readers wake on an
  event the task sets after every write.
- ``REMOTE``: another process holds the fill lock. One task per process polls
  the file's size and the lock (the kernel drops it if the writer dies); when
  the lock is free the fill is over, and it succeeded exactly when
  ``<dir>/<id>`` is now the inode we have been reading.

Readers never send the bytes that complete a body before the fill is known to
be verified: with a known size the last byte is held back, with an unknown
size the response is chunked and the terminating chunk is held back. So a
fill that fails verification (or whose writer dies) leaves every reader with
a body its client sees as broken, never a complete wrong one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from imagecache.capacity import Reservation
from imagecache.errors import CacheStoreError
from imagecache.layout import ImageId
from imagecache.records import ImageInfo

if TYPE_CHECKING:
    from imagecache.fill.scratch import Scratch

READ_CHUNK = 1024 * 1024
# How often a reader in another process looks at a fill it does not own.
REMOTE_POLL_INTERVAL = 0.02
# The longest a follower (and the management API) waits for a verified fill to commit.
COMMIT_WAIT = 30.0

# The reason of a flight that only watched for a fill (``watch``) and found none.
NO_FILL = "no_fill"
# The reason of a flight that found the image committed: look again, it is a hit.
CACHED = "cached"


class FlightKind(enum.Enum):
    PENDING = "pending"  # deciding who writes
    LOCAL = "local"  # this process writes the file
    REMOTE = "remote"  # another process writes the file; we watch it
    NONE = "none"  # no file to follow: cached meanwhile, or not cacheable


class FlightState(enum.Enum):
    RUNNING = "running"
    COMPLETE = "complete"  # every byte is in the file and verified
    FAILED = "failed"


class Flight:
    """One image's fill as seen by the readers of this process."""

    def __init__(self, image_id: ImageId, info: ImageInfo | None) -> None:
        self.image_id = image_id
        self.info = info
        self.kind = FlightKind.PENDING
        # Why there is nothing to follow (kind NONE): "cached", "too_large", ...
        self.reason = ""
        self.state = FlightState.RUNNING
        # The local fill verified every byte (its commit may still run).
        self.is_verified = False
        self.error: BaseException | None = None
        self.available = 0
        self.readers = 0
        self.had_reader = False
        self.started = time.monotonic()
        # When the fill first advanced, and how far it had got then: its rate
        # (``rate``) is measured from there, past the origin's first-byte
        # latency and, for another process's fill, the bytes it had before.
        self._first_advance: tuple[float, int] | None = None
        self.decided = asyncio.Event()
        self._changed = asyncio.Event()
        self.fd: int | None = None
        self.task: asyncio.Task[None] | None = None
        # Room held under the size limit while this process fills (capacity.py).
        self.reservation: Reservation | None = None
        # Started for no client (a prefetch, the queue worker): background
        # while no client joins it (fill/bandwidth.py).
        self.detached = False
        # Told whenever ``on_demand`` may have changed (the coordinator's busy state).
        self.on_change: Callable[[], None] | None = None
        # A segmented fill's scratch file while it fetches (fill/scratch.py): ranges
        # ahead of ``available`` are read from there.
        self.scratch: Scratch | None = None
        # Another process's fill: asks its owner to fetch byte N's segment next,
        # True if a segmented fill listens (fill/wanted.py); None: no way to ask.
        self.ask_ahead: Callable[[int], Awaitable[bool]] | None = None

    @property
    def on_demand(self) -> bool:
        """A client waits on this fill's bytes now, or is about to read them.

        A fill started for a client counts from its start (its client joins
        before it reads); once all its clients have left it is background
        work, as is a detached fill no client has joined. A verified fill
        reads nothing more from the origin.
        """
        if self.done or self.is_verified:
            return False
        return self.readers > 0 or not (self.detached or self.had_reader)

    def _demand_changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def settle(self, kind: FlightKind, reason: str) -> None:
        self.kind = kind
        self.reason = reason

    @property
    def size(self) -> int | None:
        return self.info.size if self.info is not None else None

    @property
    def done(self) -> bool:
        return self.state is not FlightState.RUNNING

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def advance(self, available: int) -> None:
        if available != self.available:
            if self._first_advance is None:
                self._first_advance = (time.monotonic(), available)
            self.available = available
            self._notify()

    def touch(self) -> None:
        """Wake the readers without an advance: a segment ahead of the frontier has more bytes."""
        self._notify()

    def rate(self, now: float, window: float) -> float | None:
        """Bytes per second the fill has written since it first advanced; None before ``window`` s.

        Averaged over the whole fill so far: steady enough to predict when it
        reaches an offset, which is all it is used for (fill/frontier.py).
        """
        if self._first_advance is None:
            return None
        since, at = self._first_advance
        if now - since < window:
            return None
        return (self.available - at) / (now - since)

    async def progressed(self, within: float) -> None:
        """Return once the fill has advanced or ended, or after ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), within)

    def finish(self, available: int) -> None:
        self.available = available
        self.state = FlightState.COMPLETE
        self._notify()
        self._maybe_close()
        self._demand_changed()

    def verified(self) -> None:
        """Every byte is in the file and verified; the commit is still to come."""
        self.is_verified = True
        self._notify()
        self._demand_changed()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.state = FlightState.FAILED
        self._notify()
        self._maybe_close()
        self._demand_changed()

    def _whole(self) -> bool:
        state = self.state
        return state is FlightState.COMPLETE or (self.is_verified and state is FlightState.RUNNING)

    def sendable(self) -> int:
        """Bytes of the file a reader may send now: all once verified, else all but the last."""
        if self._whole():
            return self.available
        size = self.size
        if size is not None:
            return min(self.available, size - 1)  # hold back the byte that completes the body
        return self.available  # chunked: the terminating chunk is what is held back

    def _maybe_close(self) -> None:
        if self.done and self.readers == 0 and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        """Count a reader while in the block: keeps the file open, tells the writer who listens."""
        self.readers += 1
        self.had_reader = True
        self._demand_changed()
        try:
            yield
        finally:
            self.readers -= 1
            self._maybe_close()
            self._demand_changed()

    async def spans(self, start: int = 0) -> AsyncGenerator[tuple[int, int], None]:
        """``(offset, count)`` of the file's bytes a reader may send next, as they land.

        Raises the fill's error if it fails. Use inside ``reading()`` (which keeps
        ``fd`` open); a reader that sends a span with ``sendfile`` never copies
        the bytes through Python.
        """
        offset = start
        while True:
            state = self.state
            whole = self._whole()
            limit = self.sendable()
            if offset < limit:
                yield offset, limit - offset
                offset = limit
                continue
            if whole:
                return
            if state is FlightState.FAILED:
                assert self.error is not None
                raise self.error
            await self._changed.wait()

    async def chunks(
        self, run: Callable[..., asyncio.Future[bytes]], start: int = 0
    ) -> AsyncIterator[bytes]:
        """The image's bytes from ``start`` in pieces of at most ``READ_CHUNK``, as they land.

        Use inside ``reading()``. ``run(func, *args)`` runs a blocking call off the loop.
        """
        async for offset, count in self.spans(start):
            fd = self.fd
            assert fd is not None, "a decided flight with readers keeps its file open"
            end = offset + count
            while offset < end:
                data = await run(os.pread, fd, min(READ_CHUNK, end - offset), offset)
                if not data:
                    raise CacheStoreError(f"the cache file of {self.image_id!r} shrank")
                offset += len(data)
                yield data
