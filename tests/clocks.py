"""A clock the test moves by hand, for the components that take a ``clock``.

A fake on purpose: what is tested is the arithmetic of a TTL, a grace or a
backoff, and waiting real seconds for it would make the test slow and, on a
loaded machine, wrong. Everything else in such a test stays real.
"""

from __future__ import annotations


class ManualClock:
    """Reads ``now``; the test moves it (``clock.now += 31``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
