"""Restart to the first served request of ``imagecache serve`` (not a test).

    .venv/bin/python bench/startup.py [--entries 1000] [--runs 10]
        [--drivers sqlite,xattr,central] [--workers 1,2]

Builds one cache directory per metadata driver with ENTRIES committed images
(4 KiB each, written through ``ImageCache`` so the metadata is the real thing:
sqlite's ``cache.db``, the xattr driver's attributes, the central driver's rows
in a PostgreSQL database at 127.0.0.1:5432 that this bench creates and drops),
over a ``directory:`` origin holding the same images. Then, RUNS times per
driver and worker count, it execs ``imagecache serve`` (the console script
beside this Python) on a fixed loopback port and measures, from just before
the exec:

- ``health``: the first ``GET /healthcheck`` answered 200;
- ``hit``:    the first ``GET /v2/images/<a cached id>/file`` answered 200 with
  its whole body (asked right after the healthcheck answered: no request can
  be served before the socket accepts, so this is when a hit could first be had);
- ``ready``:  the ``READY=1`` datagram on the ``NOTIFY_SOCKET`` the bench gives
  the service, as systemd would hear it (every first worker accepting).

- ``cpu``:    CPU-seconds (user + system, 10 ms ticks) the service's processes
  had used when the hit was answered: what a quieter or busier machine does
  not change much, where the wall-clock rows follow the load average.

A connection refused (no socket yet) is retried every millisecond; every wait
is bounded (``--timeout``). The service is stopped with SIGTERM after each run
and must exit 0. One unmeasured start per driver comes first. Bytecode is
cached as an installed package's is (``PYTHONPYCACHEPREFIX`` under the work
directory, so ``PYTHONDONTWRITEBYTECODE`` in a developer's environment does not
make every start compile imagecache anew, and the checkout gets no
``__pycache__``). Page cache is warm (the directory was just written), as it is
for a restart of a running service; a cold boot also pays disk reads.
Prints median, min and max per row; the target (issue 18) is hit <= 0.3 s.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imagecache import ImageCache, load_settings
from imagecache.records import ImageInfo

TARGET = 0.3
IMAGE_SIZE = 4096
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DB = "test"


@dataclass
class Variant:
    driver: str
    cache_dir: Path
    config: Path
    image_ids: list[str]


@dataclass
class Timings:
    health: list[float] = field(default_factory=list)
    hit: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


@dataclass
class Run:
    health: float
    hit: float
    ready: float | None
    cpu: float


def _tree_cpu(pid: int) -> float:
    """CPU-seconds used so far by ``pid`` and its live descendants (all threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            # Fields after the command name (which may hold spaces): utime is
            # the 14th field of the line, stime the 15th.
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                children = (task / "children").read_text().split()
                pending.extend(int(child) for child in children)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _toml(values: dict[str, str]) -> str:
    # Values here are paths, URLs and names made by this bench: no quotes in them.
    return "".join(f'{key} = "{value}"\n' for key, value in values.items())


def build(
    root: Path, origin: Path, driver: str, entries: int, port: int, database_url: str | None
) -> Variant:
    """A cache directory for ``driver`` with ``entries`` committed images, and its config."""
    cache_dir = root / f"cache-{driver}"
    cache_dir.mkdir()
    values = {
        "image_cache_dir": str(cache_dir),
        "upstream": f"directory:{origin}",
        "image_cache_driver": driver,
    }
    if driver == "central":
        assert database_url is not None
        values["database_url"] = database_url
        # The node's identity: the same URL at every restart, as a real node's.
        values["worker_self_reference_url"] = f"http://127.0.0.1:{port}"
    config = root / f"{driver}.toml"
    config.write_text(_toml(values))
    ids = sorted(path.name for path in origin.iterdir() if "." not in path.name)[:entries]
    with ImageCache(load_settings(config)) as cache:
        for image_id in ids:
            data = (origin / image_id).read_bytes()
            info = ImageInfo(
                image_id, len(data), hash_algo="sha256", hash_value=hashlib.sha256(data).hexdigest()
            )
            assert cache.cache_image_iter(image_id, [data], info), image_id
        assert len(cache.get_cached_images()) == len(ids)
    return Variant(driver, cache_dir, config, ids)


def make_origin(origin: Path, entries: int) -> None:
    origin.mkdir()
    for n in range(entries):
        image_id = str(uuid.UUID(int=n + 1, version=4))
        data = hashlib.sha256(image_id.encode()).digest() * (IMAGE_SIZE // 32)
        (origin / image_id).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        (origin / f"{image_id}.sha256").write_text(f"{digest}  {image_id}\n")


@contextlib.contextmanager
def postgres_database() -> Iterator[str | None]:
    """A new database for the central driver; None (with a loud line) if no server answers."""
    try:
        import psycopg
    except ImportError:
        print("SKIPPED central: psycopg is not installed", file=sys.stderr)
        yield None
        return
    name = f"imagecache_bench_{uuid.uuid4().hex[:12]}"

    def admin() -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host=PG_HOST, port=PG_PORT, dbname=PG_ADMIN_DB, autocommit=True, connect_timeout=3
        )

    try:
        with admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        print(f"SKIPPED central: no PostgreSQL at {PG_HOST}:{PG_PORT}: {exc}", file=sys.stderr)
        yield None
        return
    try:
        yield f"postgresql+psycopg://{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _get(port: int, path: str, deadline: float) -> tuple[int, bytes] | None:
    """One GET; None if nothing listens yet (refused). Raises past ``deadline``."""
    timeout = max(0.01, deadline - time.perf_counter())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


def _first_ok(port: int, path: str, start: float, deadline: float, size: int | None) -> float:
    while True:
        answer = _get(port, path, deadline)
        if answer is not None:
            status, body = answer
            if status == 200 and (size is None or len(body) == size):
                return time.perf_counter() - start
            raise RuntimeError(f"GET {path}: {status} with {len(body)} bytes")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"nothing answered GET {path} within the timeout")
        time.sleep(0.001)  # polling a socket that is not there yet; bounded by deadline


def _listen_for_ready(sock: socket.socket, start: float, out: list[float]) -> None:
    while True:
        try:
            message = sock.recv(4096)
        except OSError:
            return  # closed by the bench, or timed out
        if b"READY=1" in message.split(b"\n"):
            out.append(time.perf_counter() - start)
            return


def command() -> list[str]:
    script = Path(sys.executable).parent / "imagecache"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from imagecache.cli import main; main()"]


def serve_argv(variant: Variant, port: int, workers: int) -> list[str]:
    """``imagecache serve`` over ``variant``'s config on ``port``."""
    config = str(variant.config)
    return [*command(), "serve", "--config", config, "--port", str(port), "--workers", str(workers)]


def run_once(
    variant: Variant, workers: int, port: int, root: Path, timeout: float, image_id: str
) -> Run:
    notify_path = root / "notify.sock"
    with contextlib.suppress(FileNotFoundError):
        notify_path.unlink()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(timeout)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify_path),
        "IMAGECACHE_LOG_LEVEL": os.environ.get("IMAGECACHE_LOG_LEVEL", "WARNING"),
        "PYTHONPYCACHEPREFIX": str(root / "pycache"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    argv = serve_argv(variant, port, workers)
    log_path = root / "serve.log"
    ready: list[float] = []
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        listener = threading.Thread(target=_listen_for_ready, args=(notify, start, ready))
        listener.start()
        try:
            deadline = start + timeout
            health = _first_ok(port, "/healthcheck", start, deadline, None)
            hit = _first_ok(port, f"/v2/images/{image_id}/file", start, deadline, IMAGE_SIZE)
            cpu = _tree_cpu(process.pid)
            listener.join(max(0.0, deadline - time.perf_counter()))
        except BaseException:
            print(log_path.read_text(errors="replace"), file=sys.stderr)
            raise
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            notify.close()
            listener.join(timeout)
    if code != 0:
        print(log_path.read_text(errors="replace"), file=sys.stderr)
        raise RuntimeError(f"imagecache serve exited with {code}")
    return Run(health, hit, ready[0] if ready else None, cpu)


def _row(name: str, values: list[float]) -> str:
    if not values:
        return f"{name:>6}: -"
    return (
        f"{name:>6}: median {statistics.median(values):.3f} s"
        f"  min {min(values):.3f}  max {max(values):.3f}  (n={len(values)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--drivers", default="sqlite,xattr,central")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--timeout", type=float, default=30.0, help="per start, seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    args = parser.parse_args(argv)
    drivers = [d for d in args.drivers.split(",") if d]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    root = Path(tempfile.mkdtemp(prefix="imagecache-startup-", dir=args.workdir))
    port = _free_port()
    print(
        f"imagecache serve: restart to first request, {args.entries} cached entries, "
        f"{args.runs} runs each; load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs"
    )
    failed = False
    try:
        origin = root / "origin"
        make_origin(origin, args.entries)
        with postgres_database() if "central" in drivers else contextlib.nullcontext() as url:
            for driver in drivers:
                if driver == "central" and url is None:
                    continue
                built = time.perf_counter()
                variant = build(root, origin, driver, args.entries, port, url)
                print(f"\n{driver}: built in {time.perf_counter() - built:.1f} s")
                # Unmeasured: writes the bytecode cache, as an install would have.
                run_once(variant, 1, port, root, args.timeout, variant.image_ids[0])
                for workers in worker_counts:
                    timings = Timings()
                    for n in range(args.runs):
                        image_id = variant.image_ids[(n * 37) % len(variant.image_ids)]
                        run = run_once(variant, workers, port, root, args.timeout, image_id)
                        timings.health.append(run.health)
                        timings.hit.append(run.hit)
                        timings.cpu.append(run.cpu)
                        if run.ready is not None:
                            timings.ready.append(run.ready)
                    verdict = "meets" if statistics.median(timings.hit) <= TARGET else "MISSES"
                    print(
                        f"  --workers {workers}: {verdict} the {TARGET} s target"
                        f" (load average {os.getloadavg()[0]:.2f})"
                    )
                    for name in ("health", "hit", "ready", "cpu"):
                        print("   " + _row(name, getattr(timings, name)))
                    failed |= verdict == "MISSES"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
