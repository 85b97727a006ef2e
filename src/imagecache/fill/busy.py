"""Which worker processes have a client waiting on a fill: one locked file each, best effort.

The background fills of every worker process give way while any of them is
busy (fill/bandwidth.py), so a queue fill in one worker does not hold back a
client's miss in another. A busy process holds ``flock(LOCK_EX)`` on a file
of its own in ``<cache>/.locks/on-demand/``; it unlinks the file before it
lets go of the lock, and makes a file visible only once it holds the lock
(written under a dot name, locked, then renamed). So a file there that is not
locked belongs to a process that died busy, and is removed by whoever finds
it. Each busy period has a name of its own (pid, a token of this instance, a
count), so removing a dead one can never remove a live one reusing its name.

Best effort by design: a look is cached for ``LOOK_INTERVAL`` s, a process
busy for less may go unseen, and any error of the directory counts as "no
other process is busy" (the per-process state still holds). Only background
fills look, and only once per interval; nothing on the hot path of a client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from imagecache.fill.bandwidth import BackgroundBandwidth
from imagecache.fill.events import FillEvents
from imagecache.fill.locks import held_or_removed
from imagecache.fill.pump import Throttle

if TYPE_CHECKING:
    from imagecache.fill.config import FillConfig
    from imagecache.fill.flight import Flight

SUBDIR = "on-demand"
# How long one look at the other processes' marks is believed.
LOOK_INTERVAL = 0.1


class BusyMarks:
    """This process's mark in ``directory`` and its look at the others'. Thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._prefix = f"{os.getpid()}.{secrets.token_hex(4)}."
        self._count = 0
        self._lock = threading.Lock()
        self._mine: tuple[str, int] | None = None  # name and descriptor while busy
        self._looked = -LOOK_INTERVAL - 1.0
        self._others = False

    @property
    def marked(self) -> bool:
        return self._mine is not None

    def sync(self, wanted: Callable[[], bool]) -> None:
        """Make the mark say ``wanted()`` (blocking: call it in a thread). Idempotent.

        ``wanted`` is read under the lock, so of several calls racing in
        different threads the last to run leaves the mark as the state is now.
        """
        with self._lock:
            busy = wanted()
            try:
                if busy and self._mine is None:
                    self._mine = self._make()
                elif not busy and self._mine is not None:
                    name, fd = self._mine
                    self._mine = None
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.directory / name)  # before the lock goes: see above
                    os.close(fd)
            except OSError:
                pass  # best effort: the other processes just do not see this one

    def _make(self) -> tuple[str, int]:
        self._count += 1
        name = f"{self._prefix}{self._count}"
        self.directory.mkdir(parents=True, exist_ok=True)
        hidden = self.directory / f".{name}"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, self.directory / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            os.close(fd)
            raise
        return name, fd

    def others_busy(self, now: float | None = None) -> bool:
        """Whether another process has a mark (blocking but brief; cached for a moment)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._looked < LOOK_INTERVAL:
                return self._others
            self._looked = now
            mine = self._mine[0] if self._mine is not None else None
        found = False
        try:
            names = os.listdir(self.directory)
        except OSError:
            names = []
        for name in names:
            if name.startswith(".") or name == mine:
                continue
            if self._live(self.directory / name):
                found = True
                break
        with self._lock:
            self._others = found
        return found

    @staticmethod
    def _live(path: Path) -> bool:
        # Unlocked yet visible: its process died busy (removed). Its name is never reused.
        return held_or_removed(path, gone=OSError)


class Precedence:
    """A coordinator's background fills: its bandwidth governor, its mark, the gauge.

    ``update`` runs on the event loop whenever the coordinator's flights
    change; the governor's rate also changes in a pump's thread (another
    process became busy), and the gauge hears of it on the loop either way.
    """

    def __init__(
        self,
        config: FillConfig,
        directory: Path,
        events: FillEvents,
        executor: concurrent.futures.Executor | None,
    ) -> None:
        self.events = events
        self.executor = executor
        self._loop: asyncio.AbstractEventLoop | None = None
        self.marks = BusyMarks(directory)
        self.bandwidth = BackgroundBandwidth.of(config, on_rate=self._rate)

    def update(self, busy: bool) -> None:
        """This process is ``busy`` (on the loop): tell the governor, then the other processes."""
        self._loop = loop = asyncio.get_running_loop()
        if busy == self.bandwidth.busy:
            return
        self.bandwidth.set_busy(busy)
        with contextlib.suppress(RuntimeError):  # the executor is shut down: we are exiting
            loop.run_in_executor(self.executor, self.marks.sync, lambda: self.bandwidth.busy)

    def throttle(self, flight: Flight) -> Throttle:
        return Throttle(self.bandwidth.bucket, lambda: not flight.on_demand, self.refresh)

    def refresh(self) -> None:
        """Blocking (a pump's thread, or the executor): look at the other processes' marks."""
        self.bandwidth.set_others_busy(self.marks.others_busy())

    def _rate(self, rate: float) -> None:
        loop = self._loop
        try:
            here = loop is None or asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if here:
            self.events.background_rate_limit(rate)
        else:
            assert loop is not None
            loop.call_soon_threadsafe(self.events.background_rate_limit, rate)
