"""Client-side measurement shared by bench/run.py and bench/load.py.

Downloads are made by ``curl -o /dev/null``, one process per client, for every
peer alike: a C client costs little CPU on these 2-core machines, and the same
client in front of every server keeps the ratios fair.
"""

from __future__ import annotations

import contextlib
import hashlib
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class Sample:
    """One round of ``clients`` simultaneous downloads."""

    clients: int
    total_bytes: int
    seconds: float
    errors: int
    # Each client's time to first byte (curl's time_starttransfer), in seconds.
    ttfb: tuple[float, ...] = ()
    # The server's own CPU time (utime + stime of its process tree) over the
    # round, when the caller measured it; see bench/run.py's proxy scenarios.
    cpu_s: float | None = None
    # Full-body reads the origin served during the round, when counted.
    origin_reads: int | None = None

    @property
    def cpu_s_per_gib(self) -> float | None:
        if self.cpu_s is None or self.total_bytes <= 0:
            return None
        return self.cpu_s / (self.total_bytes / (1 << 30))

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
    Every client's time to first byte is kept (failed ones too: a 503 that
    comes at once is still what that client waited).
    """
    fmt = "%{http_code} %{size_download} %{time_starttransfer}"
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
    ttfb: list[float] = []
    for out in outs:
        code, size, start_transfer = [*out.split(), "", "", ""][:3]
        got = int(size) if size.isdigit() else 0
        total += got
        if code != "200" or got != expect_bytes:
            errors += 1
        with contextlib.suppress(ValueError):
            ttfb.append(float(start_transfer))
    return Sample(len(urls), total, seconds, errors, tuple(ttfb))


def fetch_verified(url: str, expect_bytes: int, sha512: str, timeout: float = 600.0) -> Sample:
    """One download by bench/verifying_client.py: a pass-through's consumer that verifies.

    A wrong status, size or digest is an error.
    """
    client = Path(__file__).resolve().parent / "verifying_client.py"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(client), url, str(expect_bytes), sha512],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - start
    ok = done.returncode == 0
    return Sample(1, expect_bytes if ok else 0, seconds, 0 if ok else 1)


def hash_sample(name: str, buffer: bytes) -> Sample:
    """One pass of ``hashlib.<name>`` over ``buffer`` (the fill's CPU bound), as a Sample."""
    start = time.perf_counter()
    hashlib.new(name, buffer).hexdigest()
    return Sample(1, len(buffer), time.perf_counter() - start, 0)


def hash_write_sample(name: str | None, buffer: bytes, path: Path, chunk: int = MIB) -> Sample:
    """Hash and write ``buffer`` to a new file chunk by chunk in one thread (no fsync).

    ``name=None`` only writes: the page-cache write rate on its own.

    What a fill must at least do besides moving bytes over sockets, without
    any of the service's concurrency: context for the miss ratio.
    """
    view = memoryview(buffer)
    digest = hashlib.new(name) if name else None
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as out:
        for offset in range(0, len(view), chunk):
            piece = view[offset : offset + chunk]
            if digest is not None:
                digest.update(piece)
            out.write(piece)
    seconds = time.perf_counter() - start
    path.unlink()
    return Sample(1, len(buffer), seconds, 0)


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


def recycle_memory(scratch: Path, size: int) -> None:
    """Write and delete ``size`` bytes, so the next fill's page cache is memory just freed.

    These VMs hand memory left free for a few seconds back to the host, and
    page cache made from it costs ~10x more CPU (bench/page_cache.py;
    docs/benchmarks.md, "Miss path work, part 4"). Without this, whichever
    side ran first in a round mostly got that memory and the other the pages
    it freed. It narrows the spread without ending it: the host's reporting
    pass runs every couple of seconds and can take freed memory before the
    fill reuses it (an A/A run still had 4 slow downloads in 16), so read
    ratios from 10 or more rounds.

    It is also the closer model of a cache in service: such a node's memory
    is full of page cache, and a fill's new pages come from reclaiming pages
    the guest had in use, which cost what these recycled ones do, not from
    memory idle long enough for the host to have taken it back.
    """
    block = b"\0" * MIB
    with open(scratch, "wb", buffering=0) as out:
        for _ in range(0, size, MIB):
            out.write(block)
    scratch.unlink()
