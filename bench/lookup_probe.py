"""The holder-lookup probe of bench/cluster_scale.py: one real node, in a process of its own.

Measured in a thread of the simulator, a lookup's time was mostly the time
the probe thread waited for the GIL and a CPU behind the simulated nodes'
Python (p99 86 ms while the query took 0.11 ms in the server). A real node
has its own process, so the probe does too: a real ``CentralDriver``
(``create_driver``: its own engine and pool), its own interpreter, and the
simulator can lower its own priority beneath it (``--simulator-nice``).

Protocol on stdin/stdout, one line each: the parent sends the image ids as a
JSON list; the probe answers ``ready``; ``measure`` opens the window (lookups
before it warm the pool and are not kept), ``stop`` closes it, and the
probe prints one JSON object and exits: ``lookups`` (seconds, wall time
seen by the caller), ``server`` (``EXPLAIN ANALYZE`` execution time of every
tenth lookup), ``cpu_seconds`` and ``runqueue_wait_seconds`` (the time this
process was runnable but waiting for a CPU, from /proc/self/schedstat) over
the window.

    python bench/lookup_probe.py --url URL --dir DIR --interval 0.05
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import select
import sys
import time
from pathlib import Path

from imagecache import create_driver
from imagecache.drivers.central import CentralDriver, nodes
from imagecache.settings import load_settings


def runqueue_wait() -> float:
    """Seconds this process has waited runnable for a CPU (0 where schedstat is missing)."""
    try:
        return int(Path("/proc/self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def server_time(driver: CentralDriver, image_id: str) -> float | None:
    """The lookup's execution time inside the server (EXPLAIN ANALYZE), in seconds."""
    query = driver._holders(image_id).order_by(nodes.c.url)
    dialect = driver.engine.dialect
    sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    with driver.engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").scalar()
    return None if plan is None else float(plan[0]["Execution Time"]) / 1000


def command(timeout: float) -> str | None:
    """The parent's next line if one arrives within ``timeout`` (the lookups' pacing)."""
    readable, _, _ = select.select([sys.stdin], [], [], timeout)
    return sys.stdin.readline().strip() if readable else None


def run(url: str, directory: Path, interval: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        None,
        image_cache_dir=directory,
        image_cache_driver="central",
        database_url=url,
        worker_self_reference_url="http://10.255.0.1:9393",
    )
    images: list[str] = json.loads(sys.stdin.readline())
    driver = create_driver(settings)
    assert isinstance(driver, CentralDriver)
    rng = random.Random(7)
    lookups: list[float] = []
    server: list[float] = []
    measuring = False
    marks = (0.0, 0.0)
    print("ready", flush=True)
    try:
        for round_ in range(10_000_000):  # bounded; the parent stops it long before
            image_id = rng.choice(images)
            start = time.perf_counter()
            driver.get_cached_siblings(image_id)
            elapsed = time.perf_counter() - start
            if measuring:
                lookups.append(elapsed)
                if round_ % 10 == 0:
                    taken = server_time(driver, image_id)
                    if taken is not None:
                        server.append(taken)
            line = command(interval)
            if line == "measure":
                measuring, marks = True, (cpu_seconds(), runqueue_wait())
            elif line in ("stop", ""):  # "": the parent is gone
                break
    finally:
        driver.close()
    report = {
        "lookups": lookups,
        "server": server,
        "cpu_seconds": cpu_seconds() - marks[0] if measuring else 0.0,
        "runqueue_wait_seconds": runqueue_wait() - marks[1] if measuring else 0.0,
    }
    print(json.dumps(report), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--url", required=True, help="the central database (SQLAlchemy URL)")
    p.add_argument("--dir", type=Path, required=True, help="the probe node's cache directory")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between lookups")
    args = p.parse_args(argv)
    run(args.url, args.dir, args.interval)


if __name__ == "__main__":
    main(sys.argv[1:])
