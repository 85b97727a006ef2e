"""Two parts of a fill measured alone: where the commit's time goes, and the origin read.

    .venv/bin/python bench/fill_parts.py flush --size-mib 512 --rounds 3
    .venv/bin/python bench/fill_parts.py http-read --size-mib 512 --rounds 3

``flush``: a ``FillWriter`` fed 512 MiB from a local file as the fill pump
feeds it, with the file flushed in the background every 32 MiB (``_Flusher``,
the shipped behaviour) and with that turned off (``FLUSH_STEP`` larger than
the image). Prints the copy time, the commit's own fsync and the durable rate.

``http-read``: 512 MiB from nginx (``sendfile on``) on loopback, read to the
end through aiohttp's ``iter_any`` and through the fill pump's ``http.client``
source into one reused 1 MiB buffer: wall time and this process's CPU time.
The reason the pump reads http and glance origins with ``http.client``
(``upstreams/http_source``).

Both write under ``--workdir`` (default /var/tmp/imagecache-parts), removed
afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagecache.drivers.files as files
from imagecache import ImageCache
from imagecache.records import ImageInfo
from imagecache.settings import Settings
from imagecache.upstreams.http_source import open_get
from measure import MIB
from peers import Nginx, write_random_file


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class FileReader:
    """A file read front to back, as the directory upstream's source does."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.offset = 0

    def readinto(self, buffer: memoryview) -> int:
        count = os.preadv(self.fd, [buffer], self.offset)
        self.offset += count
        return count

    def close(self) -> None:
        os.close(self.fd)


def flush(workdir: Path, size: int, rounds: int) -> None:
    source = workdir / "image"
    write_random_file(source, size)
    digest = hashlib.sha512(source.read_bytes()).hexdigest()
    shipped = files.FLUSH_STEP
    for _ in range(rounds):
        for label, step in (("background flush", shipped), ("fsync at commit only", 2 * size)):
            files.FLUSH_STEP = step
            cache_dir = workdir / "cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.sync()
            with ImageCache(Settings(image_cache_dir=str(cache_dir))) as cache:
                info = ImageInfo("img", size=size, hash_algo="sha512", hash_value=digest)
                writer = cache.writer("img", info)
                assert writer.open()
                reader = FileReader(source)
                start = time.perf_counter()
                while writer.write_from(reader.readinto):
                    pass
                copied = time.perf_counter()
                writer.verify()
                verified = time.perf_counter()
                writer.commit()
                done = time.perf_counter()
                reader.close()
                assert writer.committed
            print(
                f"{label:26s} copy+hash {verified - start:.3f} s, commit {done - verified:.3f} s,"
                f" durable {size / MIB / (done - start):5.0f} MiB/s"
                f" (verified after {size / MIB / (verified - start):5.0f} MiB/s;"
                f" hash wait {verified - copied:.3f} s)",
                flush=True,
            )
    files.FLUSH_STEP = shipped


async def read_aiohttp(url: str) -> int:
    received = 0
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.get(url) as response,
    ):
        async for chunk in response.content.iter_any():
            received += len(chunk)
    return received


def read_http_source(url: str) -> int:
    """Through the fill pump's own source (``http_source.open_get``)."""
    source = open_get(url, {"Accept-Encoding": "identity"}, 30.0, "img")
    view = memoryview(bytearray(MIB))
    received = 0
    try:
        while count := source.readinto(view):
            received += count
    finally:
        source.close()
    return received


def http_read(workdir: Path, size: int, rounds: int) -> None:
    images = workdir / "images"
    write_random_file(images / "img", size)
    with Nginx(workdir / "nginx", root=images, sendfile=True) as nginx:
        url = f"{nginx.url}/img"
        for _ in range(rounds):
            for label in ("aiohttp iter_any", "http_source (http.client)"):
                cpu, start = cpu_seconds(), time.perf_counter()
                if label.startswith("aiohttp"):
                    received = asyncio.run(read_aiohttp(url))
                else:
                    received = read_http_source(url)
                wall, used = time.perf_counter() - start, cpu_seconds() - cpu
                assert received == size
                print(f"{label:26s} {size / MIB / wall:6.0f} MiB/s, CPU {used:.3f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("flush", "http-read"))
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/imagecache-parts"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.part == "flush":
            flush(args.workdir, args.size_mib * MIB, args.rounds)
        else:
            http_read(args.workdir, args.size_mib * MIB, args.rounds)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
