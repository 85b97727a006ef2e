"""What writing fresh page cache costs on this VM, by how long ago the memory was freed.

    .venv/bin/python bench/page_cache.py [--size-mib 1024] [--waits 0,1,3,6]

For each wait W: write a file of SIZE (1 MiB writes, no fsync) and delete it,
so its pages go back to the kernel; sleep W seconds; then time writing the
file again, and the CPU that write took. A fill must put every byte of an
image into new page cache, so this is a cost a plain pass-through never pays.

Why it matters here: these guests run with free page reporting
(``page_reporting.page_reporting_order`` on the kernel command line, a
``virtio_balloon`` device). Memory the guest has left free for a couple of
seconds is handed back to the host, and the guest's next use of it faults it
in again from the host, page by page. Writes into such memory ran 10-14x
slower than into memory freed a moment earlier (docs/benchmarks.md, "Miss
path work, part 4"). Runs under ``--workdir`` (default /var/tmp), on the
filesystem the cache would use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

MIB = 1 << 20


def write_file(path: Path, chunks: int, buffer: bytes) -> tuple[float, float]:
    """Write ``chunks`` MiB to a new ``path``; returns (MiB/s, CPU seconds)."""
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        start, cpu = time.perf_counter(), time.thread_time()
        for _ in range(chunks):
            os.write(fd, buffer)
        seconds, used = time.perf_counter() - start, time.thread_time() - cpu
    finally:
        os.close(fd)
    return chunks / seconds, used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--waits", default="0,1,3,6", help="seconds, comma-separated")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    buffer = os.urandom(MIB)
    path = args.workdir / f"imagecache-page-cache-{os.getpid()}.bin"
    print(f"{args.size_mib} MiB of fresh page cache under {args.workdir}, 1 MiB writes")
    try:
        for wait in (float(w) for w in args.waits.split(",")):
            write_file(path, args.size_mib, buffer)
            path.unlink()
            time.sleep(wait)  # the point of the measurement, not a synchronisation
            rate, cpu = write_file(path, args.size_mib, buffer)
            path.unlink()
            per_page_us = cpu / (args.size_mib * MIB / 4096) * 1e6
            print(
                f"freed {wait:4.1f} s before: {rate:7.0f} MiB/s,"
                f" {cpu:5.2f} s CPU ({per_page_us:.2f} us per 4 KiB page)",
                flush=True,
            )
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
