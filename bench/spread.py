"""How a burst of concurrent hits spreads over the workers of a pre-forked service.

    .venv/bin/python bench/spread.py [--workers 2] [--clients 4,16] [--bursts 20]
        [--size-mib 256] [--src DIR]

Issue 18: with ``--workers 2`` the workers share one listening socket, and
each worker's loop accepts every connection queued when it wakes, so a burst
of 4 may land 4-0 or 3-1. A worker is one thread: an uneven split leaves a
core idle while the other worker's clients share one. This bench serves one
cached image from ``imagecache serve --workers N`` (directory origin, JSON
log), starts a burst of concurrent ``curl`` downloads of it, and counts by
the access log's ``pid`` which worker served each; it prints the
distribution of splits over the bursts (sorted, largest share first), and
the burst's wall time and the workers' CPU-seconds per GiB (only indicative
on a loaded machine: the split is structural, the time is not).

``--src`` runs another tree's ``src`` (PYTHONPATH), e.g. main's, to compare.
Not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def wait_hit(url: str, timeout: float = 60.0) -> None:
    """Until a HEAD of ``url`` says ``Cache-Status: ...hit`` (the service is up, the fill done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=5) as response:
                if "hit" in response.headers.get("Cache-Status", ""):
                    return
        except (urllib.error.HTTPError, OSError):
            pass
        time.sleep(0.05)
    sys.exit(f"{url} never became a hit")


def burst(url: str, clients: int, size: int, source: str = "127.0.0.1") -> float:
    """``clients`` downloads at once from loopback address ``source``; the wall time."""
    started = time.monotonic()
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--interface", source]
    procs = [subprocess.Popen([*argv, url], stdout=subprocess.PIPE) for _ in range(clients)]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or int(out or 0) != size:
            sys.exit(f"{url}: a client got {out!r} (exit {proc.returncode}), not {size} bytes")
    return time.monotonic() - started


def cpu_seconds(parent: int) -> float:
    """utime + stime of the service's workers (the parent only supervises)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    total = 0
    for pid in children:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def served_by(log: Path, source: str) -> list[int]:
    """The pids of the workers that logged a GET from ``source``, one per request."""
    pids = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("method") == "GET" and record.get("remote") == source:
            pids.append(int(record["pid"]))
    return pids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", default="4,16")
    parser.add_argument("--bursts", type=int, default=20)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--port", type=int, default=9486)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is missing (bench/setup.sh installs it)")
    size = args.size_mib * 2**20
    root = Path(tempfile.mkdtemp(prefix="spread-"))
    origin = root / "origin"
    origin.mkdir()
    with (origin / "img").open("wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(2**20))
    log = root / "service.log"
    env = dict(os.environ, PYTHONPATH=str(args.src.resolve()), IMAGECACHE_LOG_FORMAT="json")
    argv = [sys.executable, "-c", "from imagecache.cli import main; main()", "serve"]
    argv += ["--upstream", f"directory:{origin}"]
    argv += ["--cache-dir", str(root / "cache"), "--port", str(args.port)]
    argv += ["--workers", str(args.workers)]
    service = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    # A SIGTERM (timeout(1)) must stop the service too, or it keeps the port.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"stopped by signal {signum}"))
    path = "/v2/images/img/file"
    url = f"http://127.0.0.1:{args.port}{path}"
    try:
        _up(url, service, log)
        burst(url, 1, size)  # the fill, unmeasured
        wait_hit(url)
        print(
            f"spread: {args.workers} workers, {args.size_mib} MiB, {args.bursts} bursts, "
            f"src {args.src}, load {os.getloadavg()[0]:.2f}"
        )
        bursts = 0
        for clients in (int(c) for c in args.clients.split(",")):
            splits: collections.Counter[tuple[int, ...]] = collections.Counter()
            walls = []
            cpu_before = cpu_seconds(service.pid)
            for _ in range(args.bursts):
                # Each burst from a loopback address of its own: its access lines are known.
                bursts += 1
                source = f"127.0.{bursts // 250}.{bursts % 250 + 2}"
                walls.append(burst(url, clients, size, source))
                # A worker writes its access line after the last byte; curl may be done first.
                deadline = time.monotonic() + 10
                while len(pids := served_by(log, source)) < clients:
                    if time.monotonic() > deadline:
                        sys.exit(f"{len(pids)} access lines for a burst of {clients}")
                    time.sleep(0.02)
                shares = sorted(collections.Counter(pids).values(), reverse=True)
                shares += [0] * (args.workers - len(shares))
                splits[tuple(shares)] += 1
            per_gib = (cpu_seconds(service.pid) - cpu_before) / (
                args.bursts * clients * size / 2**30
            )
            walls.sort()
            shown = ", ".join(
                f"{'-'.join(map(str, split))} x{count}" for split, count in splits.most_common()
            )
            print(
                f"  {clients:3} clients: {shown}; burst wall median {walls[len(walls) // 2]:.2f} s,"
                f" {clients * size / 2**20 / walls[len(walls) // 2]:,.0f} MiB/s,"
                f" {per_gib:.3f} CPU-s/GiB"
            )
        print(f"  load after: {os.getloadavg()[0]:.2f}")
    finally:
        service.terminate()
        service.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _up(url: str, service: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if service.poll() is not None:
            sys.exit("imagecache exited:\n" + log.read_text()[-2000:])
        try:
            urllib.request.urlopen(url.rsplit("/v2/", 1)[0] + "/healthcheck", timeout=5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("imagecache did not start:\n" + log.read_text()[-2000:])


if __name__ == "__main__":
    main()
