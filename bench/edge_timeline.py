"""Where a round of bench/edge.py spends its time: the relay's counters sampled through it.

``--timeline DIR`` (bench/edge.py) writes one JSON file per round: the
relay's origin->edge bytes (forwarded and read), its connections and resets
every ``INTERVAL`` seconds from the round's start, each client's end and
first byte, and the wall-clock start, so the edge's own log (copied beside
it, whose lines carry wall-clock times) lines up with the samples.
``summary`` turns the samples into the few numbers a reset round is judged
by: when the cut came, how long the link carried nothing after it, when the
bytes stopped, and when the last client ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

INTERVAL = 0.05  # s: a 256 MiB image takes about 11 s on the rig's link


class Sampler:
    """A thread polling ``stats()`` (the relay's counters) until stopped (a context manager)."""

    def __init__(self, stats: Callable[[], Any], interval: float = INTERVAL) -> None:
        self._stats = stats
        self._interval = interval
        self._stop = threading.Event()
        self.started = time.monotonic()
        self.wall_start = time.time()
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._thread = threading.Thread(target=self._run, name="edge-timeline", daemon=True)

    def _run(self) -> None:
        while True:
            now = self._stats()
            self.samples.append(
                (
                    round(time.monotonic() - self.started, 3),
                    now.down_bytes,
                    now.origin_bytes,
                    now.accepted,
                    now.resets,
                )
            )
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def summary(samples: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """The moments of a round from its samples (seconds since its start).

    ``cut_s``: the first sample after a reset; ``stalled_s``: from the cut
    until the forwarded bytes grow again; ``first_byte_s`` and ``bytes_end_s``:
    when the forwarded bytes first grow and when they reach their last value;
    ``mbit_before_cut`` and ``mbit_after_resume``: the rates either side.
    """
    if not samples:
        return {}
    base = samples[0]
    last_down = samples[-1][1]
    first_byte = next((s[0] for s in samples if s[1] > base[1] + 4096), None)
    bytes_end = next((s[0] for s in samples if s[1] >= last_down), None)
    cut = next((s for s in samples if s[4] > base[4]), None)
    out: dict[str, float | None] = {
        "first_byte_s": first_byte,
        "bytes_end_s": bytes_end,
        "bytes": float(last_down - base[1]),
        "cut_s": None,
        "stalled_s": None,
        "mbit_before_cut": None,
        "mbit_after_resume": None,
    }
    if cut is None:
        return out
    resumed = next((s for s in samples if s[0] > cut[0] and s[1] > cut[1]), None)
    out["cut_s"] = cut[0]
    if first_byte is not None and cut[0] > first_byte:
        out["mbit_before_cut"] = round((cut[1] - base[1]) * 8 / 1e6 / (cut[0] - first_byte), 1)
    if resumed is not None:
        # The sample before the bytes grew again: the stall ends between the two.
        out["stalled_s"] = round(resumed[0] - cut[0], 3)
        if bytes_end is not None and bytes_end > resumed[0]:
            rate = (last_down - resumed[1]) * 8 / 1e6 / (bytes_end - resumed[0])
            out["mbit_after_resume"] = round(rate, 1)
    return out
