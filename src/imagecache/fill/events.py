"""What a fill reports as it runs, to whoever counts it: a sink passed in, not imported.

The fill coordinator calls these at the moments the service's metrics count
(``server/metrics.py``'s ``Metrics`` implements the protocol, structurally);
a program that uses the library without the service passes ``NO_EVENTS``.
Every method is called on the event loop and must return at once: no I/O.
"""

from __future__ import annotations

from typing import Literal, Protocol

# How a fill ended (the ``outcome`` label of ``imagecache_fill_seconds``):
# committed to the cache; verified but not kept (no cache copy was written, or
# its commit failed: the readers still got their verified bytes); or failed.
FillOutcome = Literal["committed", "verified", "failed"]


class FillEvents(Protocol):
    """The sink a ``FillCoordinator`` reports its fills to."""

    def fill_started(self) -> None:
        """A fill began writing in this process."""

    def fill_ended(self, outcome: FillOutcome, seconds: float) -> None:
        """A fill that ``fill_started`` ended, ``seconds`` after it started."""

    def fill_unverified(self) -> None:
        """A fill's bytes did not match the size or hash the origin promised."""

    def origin_failed(self) -> None:
        """The origin failed a fill (unreachable, 5xx, cut off mid-body)."""

    def upstream_read(self, count: int) -> None:
        """``count`` more bytes came from the upstream."""

    def background_read(self, count: int) -> None:
        """``count`` of those bytes were read by a background fill (fill/bandwidth.py)."""

    def background_throttled(self, seconds: float) -> None:
        """A background fill waited ``seconds`` more for its bandwidth."""

    def background_released(self) -> None:
        """A paused background fill closed its origin connection (to reopen it with a Range)."""

    def background_rate_limit(self, bytes_per_second: float) -> None:
        """This process's background fills may read this fast now (``math.inf``: no limit)."""


class _NoEvents:
    """A sink that counts nothing."""

    def fill_started(self) -> None:
        pass

    def fill_ended(self, outcome: FillOutcome, seconds: float) -> None:
        pass

    def fill_unverified(self) -> None:
        pass

    def origin_failed(self) -> None:
        pass

    def upstream_read(self, count: int) -> None:
        pass

    def background_read(self, count: int) -> None:
        pass

    def background_throttled(self, seconds: float) -> None:
        pass

    def background_released(self) -> None:
        pass

    def background_rate_limit(self, bytes_per_second: float) -> None:
        pass


NO_EVENTS: FillEvents = _NoEvents()

__all__ = ["NO_EVENTS", "FillEvents", "FillOutcome"]
