"""Single-flight fills: one upstream read per image, any number of readers of the growing file.

Every download of an uncached image goes through a ``Flight`` (fill/flight.py),
one per image per process, kept here. The first request creates it and its
task decides, in the disk executor, who writes: this process (``LOCAL``: it
won the fill lock and drives the fill, moving the bytes with fill/pump.py),
another process (``REMOTE``: this process polls that fill's file and lock,
fill/remote.py), or nobody (``NONE``: cached meanwhile, too large, no room, or
the cache's disk failed, and the readers stream the image uncached). Tests
hold or watch a fill at the named points of ``hooks`` (fill/hooks.py), not by
patching it. A prefetch is a detached flight (``fill_detached``). Detached
fills, and fills whose clients left, are background fills: within ``bandwidth``
(fill/bandwidth.py), kept busy while any flight of this process is on demand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from imagecache.cache import ImageCache
from imagecache.capacity import Capacity
from imagecache.errors import (
    CacheStoreError,
    ImageCacheError,
    ResumeRefused,
    VerificationError,
    is_origin_failure,
)
from imagecache.fill import remote, segments, wanted
from imagecache.fill.busy import SUBDIR, Precedence
from imagecache.fill.config import FillConfig
from imagecache.fill.events import FillEvents, FillOutcome
from imagecache.fill.flight import CACHED, COMMIT_WAIT, NO_FILL, Flight, FlightKind
from imagecache.fill.hooks import NO_HOOKS, FillHooks
from imagecache.fill.pump import pump
from imagecache.fill.writer import FillWriter
from imagecache.metadata import MetadataCache
from imagecache.records import ImageInfo
from imagecache.upstreams.base import Caller, Upstream

log = logging.getLogger(__name__)

T = TypeVar("T")


class FillCoordinator:
    """The flights of one process: at most one per image, shared by every request."""

    def __init__(
        self,
        config: FillConfig,
        cache: ImageCache,
        upstream: Upstream,
        events: FillEvents,
        executor: concurrent.futures.Executor | None,
        hooks: FillHooks = NO_HOOKS,
        *,
        capacity: Capacity | None = None,
        metadata: MetadataCache | None = None,
    ) -> None:
        self.config = config
        self.hooks = hooks  # where tests hold or watch a fill (fill/hooks.py); no-ops in production
        self.cache = cache
        self.upstream = upstream
        self.events = events
        self.executor = executor
        self._flights: dict[str, Flight] = {}
        self._closing = False
        self.capacity = capacity  # the hard size limit; None: none
        # A fill failing verification forgets the image's answer (metadata), so a
        # replaced image is asked again, not failed for a TTL.
        self.metadata = metadata
        self.lock_dir = cache.layout.lock_dir  # also fill/wanted.py's
        self.precedence = Precedence(config, self.lock_dir / SUBDIR, events, executor)
        self.bandwidth = self.precedence.bandwidth

    def run(self, func: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Run a blocking call in the disk executor (None: asyncio's default one)."""
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)

    def current(self, image_id: str) -> Flight | None:
        return self._flights.get(image_id)

    def oldest_fill_age(self) -> float:
        """Seconds since the oldest fill this process writes started; 0 with none."""
        writing = [f.started for f in self._flights.values() if f.kind is FlightKind.LOCAL]
        return time.monotonic() - min(writing) if writing else 0.0

    async def join(
        self, image_id: str, info: ImageInfo | None, caller: Caller, *, detached: bool = False
    ) -> Flight:
        """The flight of ``image_id``, started now if there is none; waits until it is decided.

        A flight whose ``kind`` is ``NONE`` has nothing to follow: the image was
        committed meanwhile (look again) or cannot be cached (stream it through).
        ``detached`` fills (prefetch) never count as abandoned.
        """
        self.hooks.joining(image_id)
        while True:
            flight = self._flights.get(image_id)
            if flight is None:
                if self._closing:
                    raise CacheStoreError("the service is shutting down; no new fills")
                flight = self._start(image_id, info, caller, detached)
            await flight.decided.wait()
            # A watch (see ``watch``) that found no fill to share is not a
            # reason to skip ours; it is gone from the table by now.
            if flight.reason != NO_FILL:
                self.hooks.joined(flight)
                return flight

    async def fill_detached(self, image_id: str, info: ImageInfo | None, caller: Caller) -> Flight:
        """Fill ``image_id`` for no client (a prefetch) and wait until the fill is over.

        Shares a fill already running here or in another process. The flight
        returned is over; one of kind ``NONE`` says why nothing was filled
        (``reason``). Raises the error of the fill it waited for.
        """
        flight = await self.join(image_id, info, caller, detached=True)
        if flight.kind is not FlightKind.NONE and flight.task is not None:
            await asyncio.shield(flight.task)
        if flight.error is not None:
            raise flight.error
        return flight

    async def watch(self, image_id: str, info: ImageInfo | None) -> Flight | None:
        """The decided flight of ``image_id`` in this process, made to watch if need be.

        For requests that must not cause a fill (a Range request: a part of an
        image is not worth one) but should share one that is running: a fill
        in a sibling worker process becomes a REMOTE flight of this process,
        which later requests here follow too. A flight of kind NONE says why
        there is nothing to follow (``NO_FILL``, or ``CACHED`` when a fill
        that was being decided found the image committed). None while the
        service shuts down.
        """
        self.hooks.watching(image_id)
        flight = self._flights.get(image_id)
        if flight is None:
            if self._closing:
                return None
            flight = self._start(image_id, info, None, detached=False)
        await flight.decided.wait()
        return flight

    def _start(
        self, image_id: str, info: ImageInfo | None, caller: Caller | None, detached: bool
    ) -> Flight:
        """A new flight, registered, its task started (a fill, or with no caller a watch)."""
        flight = Flight(self.cache.layout.accept(image_id), info)  # as is from an edge
        flight.detached = detached
        flight.on_change = self._update_busy
        # Registered before the first await: every later request of this
        # process finds it, which is the in-process half of single-flight.
        self._flights[image_id] = flight
        self._update_busy()
        kind = "fill" if caller is not None else "watch"
        flight.task = asyncio.create_task(
            self._drive(flight, caller, detached), name=f"{kind} {image_id}"
        )
        return flight

    async def _drive(self, flight: Flight, caller: Caller | None, detached: bool) -> None:
        try:
            if caller is None:
                # Watch only: follow another process's fill or settle for nothing.
                followed = await self.run(self._follow_remote, flight)
                if not followed:
                    flight.settle(FlightKind.NONE, NO_FILL)
                writer = None
            else:
                writer = await self._decide_or_bypass(flight)
            flight.decided.set()
            if flight.kind is FlightKind.LOCAL:
                assert writer is not None
                assert caller is not None
                await self._fill(flight, writer, caller, detached)
            elif flight.kind is FlightKind.REMOTE:
                # A fill that makes no progress for this long is given up on.
                stall_limit = max(60.0, 2 * self.config.upstream_timeout)
                active = self.cache.layout.active_path(flight.image_id)
                await remote.watch(flight, active, stall_limit)
        except BaseException as exc:
            if not flight.done:
                flight.fail(exc)
            if not isinstance(exc, Exception):
                raise
            log.exception("fill of %s failed unexpectedly", flight.image_id)
        finally:
            flight.decided.set()
            if self._flights.get(flight.image_id) is flight:
                del self._flights[flight.image_id]
            self._update_busy()
            if flight.reservation is not None and self.capacity is not None:
                try:
                    self.capacity.release(flight.reservation)
                except OSError as exc:
                    # A read-only disk keeps the ticket's file; its lock went with
                    # its descriptor, so the next reader drops it as a dead one.
                    log.warning("releasing the reservation of %s failed: %s", flight.image_id, exc)

    async def _decide_or_bypass(self, flight: Flight) -> FillWriter | None:
        """``_decided``, with a failure of the cache's disk there meaning "stream it uncached".

        Everything ``_decide`` touches is the cache's own (its directory, the
        ledger, the metadata): a read-only or broken disk there must cost the
        clients nothing but the cache copy (DESIGN §4), not fail their download.
        """
        try:
            return await self._decided(flight)
        except (OSError, ImageCacheError) as exc:
            log.error(
                "cannot start caching image %s: %s; streaming it uncached", flight.image_id, exc
            )
            if flight.fd is not None:
                os.close(flight.fd)
                flight.fd = None
            flight.settle(FlightKind.NONE, "cache_unavailable")
            return None

    async def _decided(self, flight: Flight) -> FillWriter | None:
        """``_decide`` in the executor, its takings given back if this task is cancelled."""
        decision = self.run(self._decide, flight)
        try:
            return await asyncio.shield(decision)
        except asyncio.CancelledError:
            # The thread cannot be stopped and may still take a reservation, the
            # fill lock and a descriptor after ``_drive`` has cleaned up; without
            # this they would be held until the process exits.
            decision.add_done_callback(lambda done: self._undo_decision(flight, done))
            raise

    def _undo_decision(self, flight: Flight, done: asyncio.Future[FillWriter | None]) -> None:
        writer = None if done.cancelled() or done.exception() else done.result()
        if writer is not None:
            gone = CacheStoreError(f"the fill of {flight.image_id!r} was cancelled")
            if self.executor is not None:
                self.executor.submit(writer.abort, gone)
            else:  # asyncio's default executor, reached through the loop we are on
                self.run(writer.abort, gone)
        if flight.readers == 0 and flight.fd is not None:
            os.close(flight.fd)
            flight.fd = None
        if flight.reservation is not None and self.capacity is not None:
            self.capacity.release(flight.reservation)

    def _decide(self, flight: Flight) -> FillWriter | None:
        """In a thread: take the fill (LOCAL), follow another process's (REMOTE), or neither."""
        image_id = flight.image_id
        self.hooks.deciding(image_id)
        if self.cache.is_cached(image_id):
            flight.settle(FlightKind.NONE, CACHED)
            return None
        if self._follow_remote(flight):
            return None
        size = flight.size
        if self.cache.too_large(size):
            flight.settle(FlightKind.NONE, "too_large")
            return None
        if self.capacity is not None:
            # Make room (evicting LRU entries) before a byte is written; no room
            # means streaming through uncached, counted as bypass "no_space".
            reservation = self.capacity.reserve(image_id, size)
            if not reservation.admission:
                flight.settle(FlightKind.NONE, reservation.admission.value)
                return None
            flight.reservation = reservation
        writer = self.cache.writer(image_id, flight.info)
        # open() takes over an incomplete file whose writer died (its lock is free).
        if writer.open():
            path = self.cache.layout.incomplete_path(image_id)
            try:
                flight.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                writer.abort(exc)
                flight.settle(FlightKind.NONE, "cache_unavailable")
                return None
            flight.settle(FlightKind.LOCAL, "")
            return writer
        if self.cache.is_cached(image_id):
            flight.settle(FlightKind.NONE, CACHED)
            return None
        if self._follow_remote(flight):
            return None
        flight.settle(FlightKind.NONE, "cache_unavailable")
        return None

    def _follow_remote(self, flight: Flight) -> bool:
        """In a thread: make ``flight`` follow another process's fill if one runs now."""
        self.hooks.looking_for_remote(flight.image_id)
        fd = remote.open_fill(self.cache.layout.incomplete_path(flight.image_id))
        if fd is not None:
            flight.fd = fd
            flight.ask_ahead = wanted.asker(self.lock_dir, flight.image_id, fd, self.run)
            flight.settle(FlightKind.REMOTE, "")
        self.hooks.looked_for_remote(flight.image_id, fd is not None)
        return fd is not None

    async def _fill(
        self, flight: Flight, writer: FillWriter, caller: Caller, detached: bool
    ) -> None:
        self.events.fill_started()
        outcome: FillOutcome = "failed"
        try:
            plan = segments.plan_for(writer, self.config)  # fill/segments.py
            one = plan.single  # a segmented fill reads its ranges with ``stream``
            source = await self.upstream.open_source(flight.image_id, caller) if one else None
            check = functools.partial(self._check_going, flight, writer, detached)
            throttle = self.precedence.throttle(flight)
            if source is None:
                args = (self.upstream, caller, plan, self.run, self.events, check, throttle)
                await segments.copy_segments(flight, writer, *args, self.lock_dir)
            else:
                await pump(flight, writer, source, self.events, check, throttle)
            await self.run(writer.verify)
            # Readers may complete their bodies now; the commit (fsync, rename,
            # metadata) is the cache's business, not their clients'.
            flight.verified()
            await self.run(self._commit, flight, writer)
            outcome = "committed" if writer.committed else "verified"
            flight.finish(writer.received)
        except BaseException as exc:
            if isinstance(exc, VerificationError):
                self.events.fill_unverified()
            # Either way what the origin promised is stale: the next miss asks again.
            if isinstance(exc, VerificationError | ResumeRefused) and self.metadata is not None:
                await asyncio.shield(self.metadata.forget(flight.image_id))
            if is_origin_failure(exc):
                self.events.origin_failed()
            await asyncio.shield(self.run(writer.abort, exc))
            flight.fail(exc)
            if not isinstance(exc, ImageCacheError | OSError):
                raise
            log.warning("fill of %s failed: %s", flight.image_id, exc)
        finally:
            self.events.fill_ended(outcome, time.monotonic() - flight.started)

    def _update_busy(self) -> None:
        """Background fills give way while any flight here is on demand (fill/bandwidth.py)."""
        self.precedence.update(any(f.on_demand for f in self._flights.values()))

    def _commit(self, flight: Flight, writer: FillWriter) -> None:
        self.hooks.before_commit(flight.image_id)
        writer.commit()

    def _check_going(self, flight: Flight, writer: FillWriter, detached: bool) -> None:
        """Raise if the fill should stop: its clients left (and we abort), or the disk failed."""
        if self._abandoned(flight, detached):
            raise CacheStoreError(
                f"fill of {flight.image_id!r} abandoned: its clients left"
                " and abandoned_fill is 'abort'"
            )
        if not writer.caching:
            # The cache's disk failed; readers of this file cannot get the rest.
            raise CacheStoreError(f"the cache copy of {flight.image_id!r} was dropped")

    def _abandoned(self, flight: Flight, detached: bool) -> bool:
        return (
            self.config.abandoned_fill == "abort"
            and not detached
            and flight.had_reader
            and flight.readers == 0
        )

    async def settled(self, flight: Flight | None = None) -> None:
        """Wait (a bounded time) for fills whose bytes are all delivered but not yet committed.

        A client has its whole body once the fill is verified, a few
        milliseconds before the commit makes the image an entry. The
        management API waits here first (for every flight), so an operator who
        downloads an image and then lists the cache of that process sees it; a
        download that joins such a flight waits for it alone.
        """
        flights = self._flights.values() if flight is None else [flight]
        tasks = [
            each.task
            for each in flights
            if each.is_verified and each.task is not None and not each.task.done()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=COMMIT_WAIT)

    async def shutdown(self, grace: float) -> None:
        """Stop starting fills; let running ones finish for ``grace`` s, then roll them back."""
        self._closing = True
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
