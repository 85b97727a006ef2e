"""The load run of issue 3: 200 clients for two minutes on a mix of hits and misses.

wrk drives ``imagecache serve`` (directory upstream, ``--workers`` processes)
with a Lua script that picks each request's image at random: ``--hot-fraction``
of them among a few larger images cached beforehand (hits), the rest among
many small cold images (misses). A side thread evicts random cold images all
along (``DELETE /v2/cache/{id}``, ``--evict-per-s``), so misses keep happening
for the whole run instead of only in its first seconds.

With ``--slow N`` a bounded slowloris client (bench/slowloris.py) holds N
loopback connections that send a header byte every ``--slow-interval``
seconds and never finish, reopening each one the service closes (its
``header_timeout``); the normal clients must not notice.

Verdict: zero errors (wrk's socket errors and non-2xx answers), and the
service's RSS and open descriptors flat from start to end (sampled every
second).

    .venv/bin/python bench/load.py                       # 200 clients, 120 s
    .venv/bin/python bench/load.py --duration 20         # a short sanity run
    .venv/bin/python bench/load.py --duration 60 --slow 300   # beside 300 slow connections
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import slowloris
from measure import MIB, ProcessSampler, fetch_all
from peers import REPO, Imagecache, PeerError, http_status, wait_until, write_random_file

RESULTS = REPO / "bench" / "results"
# Samples (one a second) before the resident set is judged settled.
WARMUP_SAMPLES = 15

LUA = """
local hot = {%(hot)s}
local cold = {%(cold)s}
local hot_fraction = %(hot_fraction)f
local counter = 0

setup = function(thread)
    counter = counter + 1
    thread:set("seed", counter)
end

init = function(args)
    math.randomseed(os.time() * 1000 + seed)
end

request = function()
    local id
    if math.random() < hot_fraction then
        id = hot[math.random(#hot)]
    else
        id = cold[math.random(#cold)]
    end
    return wrk.format("GET", "/v2/images/" .. id .. "/file")
end
"""


def make_images(images: Path, prefix: str, count: int, size: int) -> list[str]:
    """``count`` random images named ``<prefix>-<n>`` (ids the service accepts)."""
    ids = []
    for n in range(count):
        image_id = f"{prefix}-{n:05d}"
        write_random_file(images / image_id, size)
        ids.append(image_id)
    return ids


def metrics_counters(url: str) -> dict[str, float]:
    """The hit/miss/error counters of /metrics (empty when the endpoint is absent)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not re.search(r"hit|miss|bypass|error|fail", line):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def parse_wrk(text: str) -> dict[str, float]:
    """Requests, throughput and error counts from wrk's summary."""
    out: dict[str, float] = {"non_2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", text):
        out["requests"] = float(m.group(1))
        scale = {"KB": 1 / 1024, "MB": 1, "GB": 1024, "TB": 1 << 20, "B": 1 / MIB}
        out["mib_read"] = float(m.group(4)) * scale.get(m.group(5), 1)
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["requests_per_s"] = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        out["non_2xx"] = float(m.group(1))
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    ):
        for key, value in zip(("connect", "read", "write", "timeout"), m.groups(), strict=True):
            out[key] = float(value)
    return out


def evictor(ic: Imagecache, cold: list[str], per_s: int, stop: threading.Event) -> list[int]:
    """Evict ``per_s`` random cold images each second until ``stop``; count the answers."""
    statuses: list[int] = []
    rng = random.Random(7)
    while not stop.wait(1.0):
        for image_id in rng.sample(cold, min(per_s, len(cold))):
            statuses.append(http_status(f"{ic.url}/v2/cache/{image_id}", method="DELETE"))
    return statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration", type=int, default=120, help="seconds")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hot", type=int, default=20, help="cached images")
    parser.add_argument("--hot-mib", type=int, default=4)
    parser.add_argument("--cold", type=int, default=2000, help="small uncached images")
    parser.add_argument("--cold-kib", type=int, default=256)
    parser.add_argument("--hot-fraction", type=float, default=0.5)
    parser.add_argument("--evict-per-s", type=int, default=50)
    parser.add_argument("--slow", type=int, default=0, help="slowloris connections held")
    parser.add_argument("--slow-interval", type=float, default=2.0, help="seconds per byte")
    parser.add_argument("--workdir", default="/var/tmp/imagecache-bench/load")
    args = parser.parse_args(argv)
    command = "python bench/load.py " + " ".join(sys.argv[1:] if argv is None else argv)

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    images = work / "images"
    print(f"making {args.hot} hot x {args.hot_mib} MiB and {args.cold} cold x {args.cold_kib} KiB")
    hot = make_images(images, "hot", args.hot, args.hot_mib * MIB)
    cold = make_images(images, "cold", args.cold, args.cold_kib * 1024)
    script = work / "mix.lua"
    script.write_text(
        LUA
        % {
            "hot": ", ".join(f'"{i}"' for i in hot),
            "cold": ", ".join(f'"{i}"' for i in cold),
            "hot_fraction": args.hot_fraction,
        }
    )
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with Imagecache(work / "ic" / "cache", f"directory:{images}", workers=args.workers) as ic:
        for image_id in hot:
            if fetch_all([ic.file_url(image_id)], args.hot_mib * MIB).errors:
                raise SystemExit(f"warm-up of {image_id} failed")
        counters_before = metrics_counters(ic.url)
        stop = threading.Event()
        statuses: list[int] = []
        side = threading.Thread(
            target=lambda: statuses.extend(evictor(ic, cold, args.evict_per_s, stop)), daemon=True
        )
        cmd = ["wrk", "-t", "2", "-c", str(args.clients), "-d", f"{args.duration}s"]
        cmd += ["--timeout", "30s", "--latency", "-s", str(script), ic.url]
        print(" ".join(cmd), flush=True)
        slow_stats: list[slowloris.SlowStats] = []
        with ProcessSampler(lambda: (ic.rss_kib(), ic.fds()), interval=1.0) as sampler:
            side.start()
            if args.slow:
                # Held from before wrk starts until after it ends.
                slow_thread, slow_stats = slowloris.in_thread(
                    "127.0.0.1", ic.port, args.slow, args.slow_interval, args.duration + 4
                )
            wrk = subprocess.run(cmd, capture_output=True, text=True, check=False)
            stop.set()
            side.join()
            if args.slow:
                slow_thread.join(args.duration + 30)
        counters_after = metrics_counters(ic.url)
        # Closed connections take a moment to be reaped; give the service a few
        # seconds to settle back, then report whatever it holds.
        with contextlib.suppress(PeerError):
            wait_until("fds back to start", lambda: ic.fds() <= sampler.fds[0] + 4, timeout=15)
        idle_fds = ic.fds()
        idle_rss = ic.rss_kib() / 1024
    print(wrk.stdout)
    if wrk.returncode != 0:
        print(wrk.stderr, file=sys.stderr)
    stats = parse_wrk(wrk.stdout)
    errors = int(sum(stats[k] for k in ("non_2xx", "connect", "read", "write", "timeout")))
    rss_mib = [kib / 1024 for kib in sampler.rss_kib]
    # The first seconds grow the connection buffers of 200 clients; "flat" is
    # judged from there to the end.
    settled = rss_mib[min(WARMUP_SAMPLES, len(rss_mib) - 1)]
    deltas = {
        k: counters_after.get(k, 0.0) - v
        for k, v in counters_before.items()
        if counters_after.get(k, 0.0) != v
    }
    bad_evictions = sum(s not in (204, 404) for s in statuses)
    result = {
        "started": started,
        "command": command.strip(),
        "wrk": stats,
        "errors": errors,
        "evictions": len(statuses),
        "eviction_failures": bad_evictions,
        "rss_mib": {
            "start": rss_mib[0],
            "settled": settled,
            "peak": max(rss_mib),
            "end": rss_mib[-1],
        },
        "fds": {
            "start": sampler.fds[0],
            "peak": max(sampler.fds),
            "end": sampler.fds[-1],
            "idle": idle_fds,
        },
        "idle_rss_mib": idle_rss,
        "rss_series_mib": [round(v, 1) for v in rss_mib],
        "fd_series": sampler.fds,
        "metrics_deltas": deltas,
        "slow": slow_stats[0].summary() if slow_stats else None,
    }
    lines = [
        f"Load run {started}: `{result['command']}`",
        "",
        f"- requests: {stats.get('requests', 0):.0f} in {args.duration} s "
        f"({stats.get('requests_per_s', 0):.0f}/s, {stats.get('mib_read', 0):.0f} MiB read)",
        f"- errors: {errors} (non-2xx {stats['non_2xx']:.0f}, connect {stats['connect']:.0f}, "
        f"read {stats['read']:.0f}, write {stats['write']:.0f}, timeout {stats['timeout']:.0f})",
        f"- evictions during the run: {len(statuses)} ({bad_evictions} not 204/404)",
        f"- RSS (MiB, all processes): start {rss_mib[0]:.1f}, at {WARMUP_SAMPLES} s "
        f"{settled:.1f}, peak {max(rss_mib):.1f}, end {rss_mib[-1]:.1f} "
        f"(drift from {WARMUP_SAMPLES} s to end {rss_mib[-1] - settled:+.1f}), "
        f"idle after {idle_rss:.1f}",
        f"- open fds: start {sampler.fds[0]}, peak {max(sampler.fds)}, "
        f"end of load {sampler.fds[-1]}, idle after {idle_fds}",
    ]
    if slow_stats:
        slow = slow_stats[0].summary()
        lines.append(
            f"- {args.slow} slow connections (a header byte every {args.slow_interval:g} s): "
            f"{slow['opened']} opened, {slow['closed_by_server']} closed by the service "
            f"(median life {slow['median_lifetime_s']} s), {slow['refused']} refused, "
            f"at least {slow['held_min_after_ramp']} held at once after the ramp"
        )
    if deltas:
        lines.append(
            "- /metrics counters during the run: "
            + ", ".join(f"`{k}` +{v:.0f}" for k, v in sorted(deltas.items()))
        )
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "").replace("+0000", "Z")
    (RESULTS / f"load-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"load-{stamp}.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if errors == 0 and bad_evictions == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
