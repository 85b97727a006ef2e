"""Origin bandwidth for users first: a cap on background fills, and yielding to on-demand ones.

A *background* fill is one no client is waiting for: a detached flight (the
queue worker's re-drive of ``PUT /v2/cache/{id}``, a prefetch) that no client
has joined, or a client's fill whose clients all left (``abandoned_fill =
"finish"``). Every other fill is *on-demand*. The scrub re-hashes cached
files and never reads the origin (a mismatch is dropped and refilled on
demand), and the cluster has no preheat: neither is background work here.

Background fills of one process share one ``TokenBucket``, whose rate the
``BackgroundBandwidth`` governor sets:

- ``background_bandwidth`` (bytes/s for the whole service; 0 = unlimited)
  while nothing else runs;
- ``background_bandwidth_while_busy`` while this or another process has an
  on-demand fill running or a client waiting on a fill (0 = pause the
  background fills until the last such client is served). Its default is a
  trickle (1 MiB/s), not a pause: a background fill keeps moving, on one
  connection, for as long as clients keep coming; a pause closes it (below).

Both budgets are divided by ``workers``: each worker process gets its share
and does not lend an idle share to a sibling, so the service errs below the
cap, never above it. A CLI ``prefetch`` beside the service takes one more
share. A client's download streamed uncached (too large, no room) has no
flight and does not make a process busy.

A pause stops the background fill's reads at once, but an open connection
that is not read still takes the link until the TCP buffers along the path
are full (several MiB: the kernel grows a fast reader's window). So a fill
paused for longer than ``RELEASE_AFTER`` closes its origin connection (a
segmented fill, each of its N), if its source can resume (fill/pump.py,
upstreams/resume_source.py, upstreams/resume.py ``Release``), and asks for
the rest with a Range request once it may read again. A cap is left
alone: its reads keep the buffers full, so the link carries no more than
the cap on average.

The pump (fill/pump.py) asks the bucket before each
chunk of a background fill and spends the chunk's bytes after reading it; a
chunk may overdraw the bucket (a chunk's size is known only once it is read)
and the next one waits the debt off, so the average rate holds to within one
chunk plus the burst (``BURST_SECONDS`` of the rate). A paused or indebted
fill asks again at least every ``RECHECK`` seconds, which is how it notices
that the last client went or the rate changed without a wake-up of its own.

Busy is first this process's state, which the coordinator knows exactly; a
background fill also asks, at most every ``busy.LOOK_INTERVAL`` (0.1 s), whether
another worker process (or a CLI prefetch on the same directory) is busy,
through a locked file per busy process (fill/busy.py, best effort).

Pure: the clock is injected (tests pass a fake one), no I/O. Thread-safe: the
pump's threads and the event loop share one bucket.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagecache.fill.config import FillConfig

# The bucket holds at most this many seconds of its rate: enough that one
# chunk is not held for a fraction of a second at every rate, small enough
# that a background fill has little to spend once a client arrives.
BURST_SECONDS = 0.5
# The longest a waiting background fill sleeps before it asks again.
RECHECK = 0.1
# How long a background fill stays paused before it closes its origin
# connection (one ``RECHECK`` slice or two). Measured on the WAN rig
# (docs/operations.md): the shorter the wait, the less the buffers take in
# meanwhile, both of the client's link and of bytes thrown away and sent
# again (0.43 MiB at 0.1 s, 1.2 MiB at 0.25 s); a pause shorter than this
# (a small image's miss) keeps its connection. What a shorter wait costs is
# a reconnect of the background fill, at most one per pause. Not a setting:
# no site is better served by sharing its link longer.
RELEASE_AFTER = 0.1

Clock = Callable[[], float]


class TokenBucket:
    """Bytes a background fill may read now: refilled at ``rate`` per second, up to ``burst``.

    ``rate`` is ``math.inf`` for no limit and 0 for a pause. The balance may go
    below zero (a chunk read whole overdraws it); ``delay`` is then the time
    until it is back at zero.
    """

    def __init__(self, rate: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rate = rate
        self._tokens = self.burst
        self._last = clock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._rate * BURST_SECONDS if math.isfinite(self._rate) else math.inf

    @property
    def tokens(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        if math.isfinite(self._rate) and self._rate > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self._rate)

    def set_rate(self, rate: float) -> None:
        """Change the rate from now on; what was earned at the old rate is kept, up to the burst."""
        with self._lock:
            self._refill()
            self._rate = rate
            if math.isfinite(rate):
                # Leaving "unlimited" (infinite tokens) starts with a full bucket.
                self._tokens = min(self._tokens, self.burst)

    def delay(self) -> float:
        """Seconds until the next chunk may be read: 0 now, ``math.inf`` while paused."""
        with self._lock:
            if math.isinf(self._rate):
                return 0.0
            if self._rate == 0:
                return math.inf
            self._refill()
            return 0.0 if self._tokens >= 0 else -self._tokens / self._rate

    def spend(self, count: int) -> None:
        """``count`` bytes were read."""
        with self._lock:
            if math.isinf(self._rate):
                return
            self._refill()
            self._tokens -= count


def per_process(service_rate: int, workers: int, *, zero_means: float) -> float:
    """One worker's share of a service-wide rate in bytes/s; 0 stands for ``zero_means``."""
    return zero_means if service_rate == 0 else service_rate / workers


class BackgroundBandwidth:
    """The background fills' bucket of one process, at the idle or the busy rate.

    ``idle`` and ``busy`` are this process's rates (bytes/s, ``math.inf``: no
    limit, 0: pause). The coordinator calls ``set_busy`` on the event loop
    whenever its on-demand fills or waiting clients come and go; ``on_rate``
    hears every change of the rate (the metrics' gauge).
    """

    def __init__(
        self,
        idle: float,
        busy: float,
        clock: Clock = time.monotonic,
        on_rate: Callable[[float], None] | None = None,
    ) -> None:
        self.idle = idle
        # A busy rate above the idle one would let the background speed up
        # when a client arrives.
        self.busy_rate = min(busy, idle)
        self.clock = clock
        # This process is busy; another one is (fill/busy.py tells).
        self.busy = False
        self.others_busy = False
        self._lock = threading.Lock()
        self.bucket = TokenBucket(idle, clock)
        self._on_rate = on_rate
        if on_rate is not None:
            on_rate(idle)

    @classmethod
    def of(
        cls, config: FillConfig, on_rate: Callable[[float], None] | None = None
    ) -> BackgroundBandwidth:
        """This process's share of the service's ``background_bandwidth*`` settings."""
        workers = config.workers
        return cls(
            per_process(config.background_bandwidth, workers, zero_means=math.inf),
            per_process(config.background_bandwidth_while_busy, workers, zero_means=0.0),
            on_rate=on_rate,
        )

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def set_busy(self, busy: bool) -> None:
        """This process has an on-demand fill or a waiting client (on the event loop)."""
        with self._lock:
            self.busy = busy
            rate = self._apply()
        self._tell(rate)

    def set_others_busy(self, busy: bool) -> None:
        """Another process has (in any thread)."""
        with self._lock:
            self.others_busy = busy
            rate = self._apply()
        self._tell(rate)

    def _apply(self) -> float | None:
        rate = self.busy_rate if self.busy or self.others_busy else self.idle
        if rate == self.bucket.rate:
            return None
        self.bucket.set_rate(rate)
        return rate

    def _tell(self, rate: float | None) -> None:
        if rate is not None and self._on_rate is not None:
            self._on_rate(rate)
