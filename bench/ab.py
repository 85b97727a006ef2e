"""Before/after for one code change: the same cold download against two source trees.

    git worktree add /tmp/ic-base HEAD          # the "before" tree
    .venv/bin/python bench/ab.py --base /tmp/ic-base/src --size-mib 512 --rounds 6
    .venv/bin/python bench/ab.py --base /tmp/ic-base/src --clients 32   # fill + 31 followers
    .venv/bin/python bench/ab.py --base /tmp/ic-base/src --mode hit      # cached GETs
    git worktree remove /tmp/ic-base

Both services run at once (``imagecache serve``, directory upstream, their own
cache dirs), started from this venv with ``PYTHONPATH`` naming each tree's
``src``. Every round empties both caches and downloads the image cold from each,
in alternating order; a ratio is the median of the per-round ratios (new/base),
which cancels most of a shared machine's drift. Also reported per round: the
CPU seconds the service's processes used (``/proc/<pid>/stat``) and their peak
RSS growth (sampled every 0.1 s); with ``--upstream http``, the body reads the
origin served in the round (its access log: 1 per round whatever ``--clients``).

``--mode hit`` measures cached GETs instead: each round fills the image once
(not measured), then downloads it from the cache with ``--clients`` clients.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import MIB, Sample, fetch_all, recycle_memory
from peers import (
    REPO,
    Nginx,
    PeerError,
    file_digests,
    free_port,
    http_status,
    proc_status_kib,
    process_tree,
    settle_fill,
    stop_process,
    wait_until,
    write_random_file,
)

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Service:
    """One ``imagecache serve`` running the code of ``src``."""

    name: str
    src: Path
    cache_dir: Path
    upstream: str
    workers: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(self.src))
        cmd = [sys.executable, "-c", "from imagecache.cli import main; main()", "serve"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--cache-dir", str(self.cache_dir)]
        cmd += ["--upstream", self.upstream, "--workers", str(self.workers)]
        log = open(self.cache_dir.parent / f"{self.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        wait_until(self.name, lambda: http_status(f"{self.url}/healthcheck") == 200, timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def evict(self, image_id: str) -> None:
        settle_fill(self.cache_dir, image_id)
        status = http_status(f"{self.url}/v2/cache/{image_id}", method="DELETE")
        if status not in (204, 404):
            raise PeerError(f"evicting from {self.name} answered {status}")

    def cpu_seconds(self) -> float:
        total = 0
        for pid in process_tree(self.proc.pid) if self.proc else []:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / TICKS

    def rss_kib(self) -> int:
        pids = process_tree(self.proc.pid) if self.proc else []
        return sum(proc_status_kib(pid, "VmRSS") for pid in pids)


@dataclass(frozen=True)
class Round:
    sample: Sample
    cpu: float
    rss_growth_mib: float
    origin_reads: int | None = None


def cold_round(
    service: Service,
    image_id: str,
    size: int,
    clients: int,
    scratch: Path | None,
    *,
    hit: bool = False,
    origin: Nginx | None = None,
) -> Round:
    service.evict(image_id)
    if hit:
        # The fill is the set-up, not the measurement; settle its commit so
        # every measured GET is a hit.
        warm = fetch_all([f"{service.url}/v2/images/{image_id}/file"], size)
        if warm.errors:
            raise PeerError(f"{service.name}: the warm-up download failed")
        settle_fill(service.cache_dir, image_id)
    subprocess.run(["sync"], check=True)  # the last round's dirty pages are not this round's cost
    if scratch is not None and not hit:
        recycle_memory(scratch, size)
    reads_before = origin.requests_for(f"/{image_id}") if origin is not None else 0
    peak = start_rss = service.rss_kib()
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, service.rss_kib())

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    cpu = service.cpu_seconds()
    try:
        sample = fetch_all([f"{service.url}/v2/images/{image_id}/file"] * clients, size)
    finally:
        done.set()
        sampler.join()
    reads = None
    if origin is not None:
        reads = origin.requests_for(f"/{image_id}") - reads_before
    return Round(sample, service.cpu_seconds() - cpu, (peak - start_rss) / 1024, reads)


def _ttfb(got: Round) -> float:
    """The round's median time to first byte over its clients (curl's), in seconds."""
    return statistics.median(got.sample.ttfb) if got.sample.ttfb else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the 'before' tree's src dir")
    parser.add_argument("--new", type=Path, default=REPO / "src", help="default: this tree")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--mode", choices=("miss", "hit"), default="miss")
    parser.add_argument(
        "--upstream",
        choices=("directory", "http"),
        default="directory",
        help="http: an nginx origin serving the image with Content-MD5",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/imagecache-ab"))
    parser.add_argument(
        "--cold-memory",
        action="store_true",
        help="do not recycle memory before each download (see recycle_memory)",
    )
    args = parser.parse_args(argv)

    shutil.rmtree(args.workdir, ignore_errors=True)
    images = args.workdir / "images"
    images.mkdir(parents=True)
    size = args.size_mib * MIB
    image_id = str(uuid.uuid4())
    write_random_file(images / image_id, size)
    md5, sha512 = file_digests(images / image_id)
    (images / f"{image_id}.md5").write_text(md5 + "\n")
    (images / f"{image_id}.sha512").write_text(sha512 + "\n")

    origin = None
    upstream = f"directory:{images}"
    if args.upstream == "http":
        origin = Nginx(
            args.workdir / "origin", root=images, md5_headers={image_id: md5}, access_log=True
        )
        origin.__enter__()
        upstream = f"http:{origin.url}/{{image_id}}"
    services = [
        Service(name, src.resolve(), args.workdir / name / "cache", upstream, args.workers)
        for name, src in (("base", args.base), ("new", args.new))
    ]
    rounds: dict[str, list[Round]] = {s.name: [] for s in services}
    try:
        for r in range(args.rounds):
            # Fresh processes every round, started in alternating order: an A/A
            # run (the same tree twice) with long-lived services showed one of
            # them 15-20% faster for the whole run whichever tree it ran.
            # Each tree also takes the other's cache directory every other
            # round, so neither keeps the disk blocks of one directory.
            order = services[r % 2 :] + services[: r % 2]
            for slot, service in enumerate(order):
                service.cache_dir = args.workdir / f"slot-{slot}" / "cache"
                service.start()
            for service in order:
                scratch = None if args.cold_memory else args.workdir / "scratch"
                got = cold_round(
                    service,
                    image_id,
                    size,
                    args.clients,
                    scratch,
                    hit=args.mode == "hit",
                    origin=origin,
                )
                if got.sample.errors:
                    raise PeerError(f"{service.name}: {got.sample.errors} failed downloads")
                rounds[service.name].append(got)
            for service in services:
                service.stop()
            base, new = rounds["base"][-1], rounds["new"][-1]
            reads = ""
            if base.origin_reads is not None:
                reads = f" | origin reads base {base.origin_reads} new {new.origin_reads}"
            print(
                f"round {r + 1}: base {base.sample.mib_s:7.1f} MiB/s {base.cpu:5.2f} cpu-s"
                f" +{base.rss_growth_mib:5.1f} MiB TTFB {_ttfb(base) * 1000:.1f} ms"
                f" | new {new.sample.mib_s:7.1f} MiB/s {new.cpu:5.2f} cpu-s"
                f" +{new.rss_growth_mib:5.1f} MiB TTFB {_ttfb(new) * 1000:.1f} ms{reads}",
                flush=True,
            )
    finally:
        for service in services:
            service.stop()
        if origin is not None:
            origin.__exit__(None, None, None)
        shutil.rmtree(args.workdir, ignore_errors=True)

    def med(name: str, what: str) -> float:
        if what == "ttfb":
            return statistics.median(_ttfb(r) for r in rounds[name])
        values = [r.sample.mib_s if what == "rate" else getattr(r, what) for r in rounds[name]]
        return statistics.median(values)

    ratios = [
        n.sample.mib_s / b.sample.mib_s for b, n in zip(rounds["base"], rounds["new"], strict=True)
    ]
    cpu_ratios = [
        n.cpu / b.cpu for b, n in zip(rounds["base"], rounds["new"], strict=True) if b.cpu > 0
    ]
    reads = {
        name: sorted({r.origin_reads for r in rounds[name] if r.origin_reads is not None})
        for name in rounds
    }
    print(
        f"{args.mode}, {args.upstream}, {args.size_mib} MiB, {args.clients} client(s),"
        f" {args.rounds} rounds, median:"
        f" base {med('base', 'rate'):.0f} MiB/s, {med('base', 'cpu'):.2f} cpu-s,"
        f" +{med('base', 'rss_growth_mib'):.0f} MiB, TTFB {med('base', 'ttfb') * 1000:.1f} ms;"
        f" new {med('new', 'rate'):.0f} MiB/s, {med('new', 'cpu'):.2f} cpu-s,"
        f" +{med('new', 'rss_growth_mib'):.0f} MiB, TTFB {med('new', 'ttfb') * 1000:.1f} ms;"
        f" new/base {statistics.median(ratios):.2f}"
        f" (per round {min(ratios):.2f}-{max(ratios):.2f}),"
        f" cpu new/base {statistics.median(cpu_ratios) if cpu_ratios else float('nan'):.2f}"
        + (
            f"; origin reads per round base {reads['base']} new {reads['new']}"
            if reads["base"]
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
