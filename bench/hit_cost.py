"""Where a cached hit's CPU goes, by client count: user vs kernel time, syscalls per GiB.

    .venv/bin/python bench/hit_cost.py [--size-mib 512] [--clients 1,4,16] [--rounds 3] [--strace]

Issue 18 asks why a hit costs more CPU per GiB with several clients than with
one. This bench serves one cached image from ``imagecache serve`` (one
worker, directory origin) and the same file from nginx (``sendfile on;
tcp_nopush on``, one worker), rounds interleaved, N concurrent ``curl``
downloads per round, and reports per subject and client count the median
user and system CPU-seconds per GiB delivered (``/proc/PID/stat`` utime and
stime, 10 ms ticks: at 512 MiB one tick is 0.02 CPU-s/GiB). With
``--strace`` one extra round per client count runs under ``strace -f -c``
and prints the serving process's syscalls per GiB (strace slows the process;
its round is not in the CPU medians).

Not a test; numbers are ratios of subjects measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  server {{ listen 127.0.0.1:{port}; root {origin}; }}
}}
"""


def cpu(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK  # utime, stime


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until ``url`` answers a HEAD with any HTTP status (the server accepts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_hit(url: str, timeout: float = 30.0) -> None:
    """Until a HEAD of ``url`` says ``Cache-Status: imagecache; hit`` (the fill committed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=5) as response:
            if "hit" in response.headers.get("Cache-Status", ""):
                return
        time.sleep(0.05)
    sys.exit(f"{url} never became a hit")


def download(url: str, clients: int, size: int) -> float:
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", url], stdout=subprocess.PIPE
        )
        for _ in range(clients)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0 or int(out or 0) != size:
            sys.exit(f"{url}: a client got {out!r} (exit {proc.returncode}), not {size} bytes")
    return time.monotonic() - started


def strace_round(pid: int, url: str, clients: int, size: int, out: Path) -> dict[str, int]:
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-p", str(pid), "-o", str(out)], stderr=subprocess.DEVNULL
    )
    time.sleep(1.0)  # attach to every thread first (strace has no "attached" signal)
    download(url, clients, size)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strace", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    size = args.size_mib * 2**20
    for tool in ("curl", "nginx") + (("strace",) if args.strace else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (bench/setup.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix="hit-cost-"))
    root.chmod(0o755)  # nginx's worker runs as another user
    origin = root / "origin"
    origin.mkdir()
    with (origin / "img").open("wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(2**20))
    (root / "nginx.conf").write_text(NGINX_CONF.format(root=root, port=9497, origin=origin))
    service = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "imagecache"),
            "serve",
            "--upstream",
            f"directory:{origin}",
            "--cache-dir",
            str(root / "cache"),
            "--port",
            "9496",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(root / "service.log").open("wb"),
    )
    nginx = subprocess.Popen(["nginx", "-c", str(root / "nginx.conf")])
    subjects = {
        "imagecache": (service.pid, "http://127.0.0.1:9496/v2/images/img/file"),
        "nginx": (0, "http://127.0.0.1:9497/img"),
    }
    try:
        try:
            wait_http("http://127.0.0.1:9496/healthcheck")
        except OSError:
            sys.exit("imagecache did not start:\n" + (root / "service.log").read_text()[-2000:])
        wait_http("http://127.0.0.1:9497/")
        nginx_worker = int(subprocess.check_output(["pgrep", "-P", str(nginx.pid)]).split()[0])
        subjects["nginx"] = (nginx_worker, subjects["nginx"][1])
        download(subjects["imagecache"][1], 1, size)  # the fill, unmeasured
        wait_hit(subjects["imagecache"][1])
        for _, url in subjects.values():
            download(url, 1, size)  # warm, unmeasured
        print(f"hit cost: {args.size_mib} MiB, rounds {args.rounds}, load {os.getloadavg()[0]:.2f}")
        for clients in counts:
            rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in subjects}
            for _ in range(args.rounds):
                for name, (pid, url) in subjects.items():
                    u0, s0 = cpu(pid)
                    seconds = download(url, clients, size)
                    u1, s1 = cpu(pid)
                    gib = clients * size / 2**30
                    rate = clients * size / 2**20 / seconds
                    rows[name].append(((u1 - u0) / gib, (s1 - s0) / gib, rate))
            for name, samples in rows.items():
                user = statistics.median(s[0] for s in samples)
                system = statistics.median(s[1] for s in samples)
                rate = statistics.median(s[2] for s in samples)
                print(
                    f"  {name:10} {clients:3} clients: user {user:.3f} sys {system:.3f} "
                    f"CPU-s/GiB, {rate:,.0f} MiB/s"
                )
            if args.strace:
                for name, (pid, url) in subjects.items():
                    calls = strace_round(pid, url, clients, size, root / f"{name}-{clients}.strace")
                    gib = clients * size / 2**30
                    top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
                    shown = ", ".join(f"{call} {count / gib:,.0f}" for call, count in top)
                    print(f"  {name:10} {clients:3} clients, syscalls per GiB: {shown}")
    finally:
        service.terminate()
        nginx.terminate()
        service.wait(timeout=30)
        nginx.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
