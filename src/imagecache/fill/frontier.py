"""A range that starts past what a fill has written: wait for the fill, or read the origin?

The choice rests on one number, ``range_wait_limit`` (seconds; Settings): a
range waits while the fill is expected to write the range's first byte
within that long of the range's arrival, judged by the fill's own measured
rate (bytes written since its first write ÷ seconds since). Waiting costs the
client time; not waiting costs the origin a second read of those bytes, and
on an edge link that second read competes with the fill for the same
bandwidth, so it is rarely faster than the fill itself. The limit is the
operator's price for that read; a fill far away or stalled (its rate says it
will not get there in time) sends the range to the origin at once.

Before the fill has written for ``RATE_WINDOW`` seconds its rate says little
(TCP slow start, the origin's first-byte latency): the range waits without
judging, within the same limit. A fill that stops advancing is judged again
every ``RECHECK`` seconds, so a stall also ends the wait.

A segmented fill (fill/segments.py) does better than either: a range that
starts in one of its later segments joins it at once (``joins``), and is
served from the fill's scratch file as that segment arrives, the segment
fetched by the next free connection (fill/scratch.py). A range in a sibling
process asks that process for its segment (fill/wanted.py) and, once asked,
waits for the fill's frontier without judging its rate: the segment is being
fetched next and the frontier passes it at copy speed. This knows no HTTP:
the route (server/images.py) decides what a refusal means (the origin).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from imagecache.fill.flight import Flight

# Seconds of writing before a fill's rate is trusted for a prediction.
RATE_WINDOW = 0.5
# How often a waiting range looks again when the fill has not advanced.
RECHECK = 0.25


def eta(flight: Flight, offset: int, now: float, window: float = RATE_WINDOW) -> float | None:
    """Seconds until ``flight`` writes byte ``offset`` at its rate so far; None: not yet known.

    0 once it has; infinite for a fill measured at no progress.
    """
    gap = offset + 1 - flight.available
    if gap <= 0:
        return 0.0
    rate = flight.rate(now, window)
    if rate is None:
        return None
    return gap / rate if rate > 0 else float("inf")


def joins(flight: Flight, offset: int) -> bool:
    """Whether a segmented fill will fetch byte ``offset`` next if asked (fill/scratch.py).

    True for a byte of a segment the fill fetches into its scratch file: the
    range is served from there, its segment asked for, whatever the fill's
    rate. The first segment is read in order into the fill's file, so a byte
    in it is judged by the rate like any fill's.
    """
    scratch = flight.scratch
    return scratch is not None and not scratch.closed and scratch.segment_at(offset) is not None


async def reaches(
    flight: Flight,
    offset: int,
    limit: float,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Wait for ``flight`` to write byte ``offset``; False once it will not within ``limit`` s.

    True when the byte is there, when the fill has ended (the follow that
    comes next tells how), or when a segmented fill fetches it next
    (``joins``), or in another process has been asked to; False when waiting
    would take past ``limit`` seconds from now
    by the fill's rate, or has.
    """
    arrived = clock()
    ask = flight.ask_ahead
    if ask is not None and flight.available <= offset and not flight.done and await ask(offset):
        return True  # another process's segmented fill fetches it next
    while flight.available <= offset and not flight.done:
        if joins(flight, offset):
            return True
        now = clock()
        waited = now - arrived
        if waited >= limit:
            return False
        expected = eta(flight, offset, now)
        if expected is not None and waited + expected > limit:
            return False
        await flight.progressed(min(RECHECK, limit - waited))
    return True


__all__ = ["RATE_WINDOW", "RECHECK", "eta", "joins", "reaches"]
