"""Client-side measurement shared by bench/run.py and bench/load.py.

Downloads are made by ``curl -o /dev/null``, one process per client, for every
peer alike: a C client costs little CPU on these 2-core machines, and the same
client in front of every server keeps the ratios fair.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One round of ``clients`` simultaneous downloads."""

    clients: int
    total_bytes: int
    seconds: float
    errors: int

    @property
    def mib_s(self) -> float:
        return self.total_bytes / MIB / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Throughput:
    """The median of several rounds (the noise of a shared machine is in the spread)."""

    samples: list[Sample]

    @property
    def median(self) -> float:
        return statistics.median(s.mib_s for s in self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        rates = [s.mib_s for s in self.samples]
        return min(rates), max(rates)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.samples)


def fetch_all(urls: list[str], expect_bytes: int, timeout: float = 600.0) -> Sample:
    """Start one curl per URL at once; the round lasts until the last one ends.

    A download that does not answer 200 with exactly ``expect_bytes`` is an error.
    """
    fmt = "%{http_code} %{size_download}"
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-w", fmt, "--max-time", str(int(timeout)), url],
            stdout=subprocess.PIPE,
            text=True,
        )
        for url in urls
    ]
    outs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - start
    total = errors = 0
    for out in outs:
        code, _, size = out.partition(" ")
        got = int(size) if size.strip().isdigit() else 0
        total += got
        if code != "200" or got != expect_bytes:
            errors += 1
    return Sample(len(urls), total, seconds, errors)


def throughput(
    url: str,
    expect_bytes: int,
    clients: int = 1,
    reps: int = 3,
    before_each: Callable[[], None] | None = None,
) -> Throughput:
    """``reps`` rounds of ``clients`` concurrent GETs of ``url`` (``before_each`` resets state)."""
    samples = []
    for _ in range(reps):
        if before_each is not None:
            before_each()
        samples.append(fetch_all([url] * clients, expect_bytes))
    return Throughput(samples)


def hash_rate(name: str, size: int) -> float:
    """MiB/s of ``hashlib.<name>`` over one ``size``-byte buffer (the fill's CPU bound)."""
    buffer = os.urandom(size)
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        hashlib.new(name, buffer).hexdigest()
        best = max(best, size / MIB / (time.perf_counter() - start))
    return best


@dataclass
class ProcessSampler:
    """Samples RSS and open descriptors of a set of processes in a background thread."""

    read: Callable[[], tuple[int, int]]  # () -> (rss KiB, open fds)
    interval: float = 0.1
    rss_kib: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ProcessSampler:
        self._take()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()

    def _take(self) -> None:
        rss, fds = self.read()
        self.rss_kib.append(rss)
        self.fds.append(fds)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()
