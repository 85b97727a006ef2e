"""Where a cold download's CPU goes, thread by thread: one ``--workers 1`` service, N misses.

    .venv/bin/python bench/fill_threads.py                      # directory origin, 6 x 1 GiB
    .venv/bin/python bench/fill_threads.py --upstream http      # nginx origin (sha512 sidecar)
    .venv/bin/python bench/fill_threads.py --env IMAGECACHE_FILL_HASH_NICE=-10
    .venv/bin/python bench/fill_threads.py --src /tmp/ic-base/src   # another tree

Starts ``imagecache serve`` from ``--src`` (default: this tree) with its
threads named for the OS (a ``sitecustomize`` in a temporary directory sets
each Python thread's name with ``prctl``, which Python 3.11 does not do), then
for each round evicts the image, waits for the page cache (``--wait`` seconds;
see bench/page_cache.py), and downloads it once with curl while sampling
``/proc/<pid>/task/*/stat`` every 20 ms. Prints each round's rate and how busy
the whole machine was, then the median rate and the CPU seconds per round of
each thread name: ``imagecache-hash`` (the fill's hash), ``imagecache-fill-*``
(the pump), ``imagecache-flush`` (background fdatasync), and ``python`` (the
event loop and the disk executor). A thread's last 20 ms before it ends may be
missed. Used for docs/benchmarks.md, "Miss path work, part 4".
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers import (
    REPO,
    Nginx,
    file_digests,
    free_port,
    http_status,
    settle_fill,
    stop_process,
    wait_until,
    write_random_file,
)

TICKS = os.sysconf("SC_CLK_TCK")

_NAME_THREADS = """
import ctypes, threading
_prctl = ctypes.CDLL(None).prctl
_run = threading.Thread.run
def _named_run(self):
    _prctl(15, self.name[:15].encode(), 0, 0, 0)  # PR_SET_NAME
    return _run(self)
threading.Thread.run = _named_run
"""

ThreadTimes = dict[tuple[int, int], tuple[str, int, int, int, int]]


def thread_times(pid: int) -> ThreadTimes:
    """(pid, tid) -> (name, utime, stime, ns runnable not running, runs) for ``pid``'s tree.

    The last two come from ``schedstat``: time a thread was ready to run and
    waited for a CPU, which is what another thread's work costs it here, and
    how many times it was put on a CPU (each one a wake-up or a preemption
    ended: on these VMs a wake-up across vCPUs costs an exit to the host).
    """
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out: ThreadTimes = {}
    for proc in [pid, *map(int, children)]:
        for tid in os.listdir(f"/proc/{proc}/task"):
            try:
                stat = Path(f"/proc/{proc}/task/{tid}/stat").read_text()
                sched = Path(f"/proc/{proc}/task/{tid}/schedstat").read_text().split()
            except FileNotFoundError:
                continue  # ended between the listing and the read
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rpartition(")")[2].split()
            out[(proc, int(tid))] = (
                name,
                int(fields[11]),
                int(fields[12]),
                int(sched[1]),
                int(sched[2]),
            )
    return out


def sample_until(stop: threading.Event, pid: int, seen: ThreadTimes) -> None:
    """Keep the latest times of every thread seen, until ``stop`` (threads come and go)."""
    while not stop.wait(0.02):
        seen.update(thread_times(pid))


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs (idle and iowait are not busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=REPO / "src")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--wait", type=float, default=0.0, help="seconds between evict and GET")
    parser.add_argument("--upstream", choices=("directory", "http"), default="directory")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/imagecache-threads"))
    args = parser.parse_args(argv)

    shutil.rmtree(args.workdir, ignore_errors=True)
    images = args.workdir / "images"
    images.mkdir(parents=True)
    image_id = str(uuid.uuid4())
    write_random_file(images / image_id, args.size_mib << 20)
    md5, sha512 = file_digests(images / image_id)
    (images / f"{image_id}.sha512").write_text(sha512 + "\n")
    site = Path(tempfile.mkdtemp(prefix="imagecache-site-"))
    (site / "sitecustomize.py").write_text(_NAME_THREADS)
    env = dict(os.environ, PYTHONPATH=f"{site}:{args.src.resolve()}")
    env.update(item.split("=", 1) for item in args.env)
    cache_dir = args.workdir / "cache"
    origin = None
    upstream = f"directory:{images}"
    cmd = [sys.executable, "-c", "from imagecache.cli import main; main()", "serve"]
    if args.upstream == "http":
        origin = Nginx(args.workdir / "nginx", root=images, md5_headers={image_id: md5})
        origin.__enter__()
        upstream = f"http:{origin.url}/{{image_id}}"
        env["IMAGECACHE_HTTP_CHECKSUM_SIDECAR"] = "true"
    port = free_port()
    cmd += ["--port", str(port), "--cache-dir", str(cache_dir), "--upstream", upstream]
    with open(args.workdir / "service.log", "wb") as log:
        service = subprocess.Popen(
            [*cmd, "--workers", "1"], env=env, stdout=log, stderr=log, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    per_name: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    rates = []
    try:
        wait_until("imagecache", lambda: http_status(f"{url}/healthcheck") == 200, timeout=60)
        for r in range(args.rounds):
            settle_fill(cache_dir, image_id)
            http_status(f"{url}/v2/cache/{image_id}", method="DELETE")
            subprocess.run(["sync"], check=True)
            time.sleep(args.wait)  # the page cache's age is the variable here, not a sync
            before, seen = thread_times(service.pid), ThreadTimes()
            stop = threading.Event()
            sampler = threading.Thread(target=sample_until, args=(stop, service.pid, seen))
            sampler.start()
            busy0, total0 = machine_busy()
            start = time.perf_counter()
            subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", f"{url}/v2/images/{image_id}/file"], check=True
            )
            seconds = time.perf_counter() - start
            busy1, total1 = machine_busy()
            settle_fill(cache_dir, image_id)
            stop.set()
            sampler.join()
            seen.update(thread_times(service.pid))
            for key, (name, user, system, waited, runs) in seen.items():
                _, user0, system0, waited0, runs0 = before.get(key, (name, 0, 0, 0, 0))
                per_name[name][0] += user - user0
                per_name[name][1] += system - system0
                per_name[name][2] += waited - waited0
                per_name[name][3] += runs - runs0
            rates.append(args.size_mib / seconds)
            share = 100 * (busy1 - busy0) / (total1 - total0)
            print(
                f"round {r + 1}: {rates[-1]:6.0f} MiB/s; machine {(busy1 - busy0) / TICKS:.2f}"
                f" cpu-s in {seconds:.2f} s ({share:.0f}% busy)",
                flush=True,
            )
    finally:
        stop_process(service)
        if origin is not None:
            origin.__exit__(None, None, None)
        shutil.rmtree(site, ignore_errors=True)
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"median {statistics.median(rates):.0f} MiB/s over {args.rounds} rounds; per round:")
    for name, (user, system, waited, runs) in sorted(
        per_name.items(), key=lambda kv: -sum(kv[1][:2])
    ):
        if user or system:
            per_round = args.rounds * TICKS
            print(
                f"  {name:16s} user {user / per_round:.2f} s, sys {system / per_round:.2f} s,"
                f" waited for a CPU {waited / args.rounds / 1e9:.2f} s,"
                f" put on a CPU {runs / args.rounds:,.0f} times"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
