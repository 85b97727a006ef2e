"""Micro-benchmark of the sqlite driver's metadata operations (not a test).

    .venv/bin/python bench/metadata.py [--entries 100000] [--hits 50000] [--prune 10000]

Measures, on a throw-away cache directory:

- recorded hits per second through ``SqliteDriver.record_hit`` (one persistent
  connection, WAL), and the same through Glance's pattern for context: a new
  connection per operation in rollback-journal mode;
- listing N entries with ``get_cached_images``;
- pruning M entries with ``ImageCache.prune`` (real files are unlinked).

Targets (issue 2): >= 20,000 hits/s, listing 100k entries < 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from imagecache import ImageCache, load_settings
from imagecache.drivers.sqlite import SqliteDriver

HIT_TARGET = 20_000.0
LIST_TARGET = 0.5


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _add_rows(driver: SqliteDriver, count: int) -> list[str]:
    # Straight into the table: going through real fills would measure the
    # filesystem, not the metadata. Rows only, so they are added after
    # configure (whose reconciliation would drop rows without files).
    # Glance image ids are UUIDs: random order, as a real cache's rows are.
    ids = [str(uuid.uuid4()) for _ in range(count)]
    now = time.time()
    rows = ((image_id, now - count + n, now - count, 1024) for n, image_id in enumerate(ids))
    with driver._tx() as conn:
        conn.executemany(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits)"
            " VALUES (?, ?, ?, ?, 0)",
            rows,
        )
    return ids


@contextlib.contextmanager
def _sqlite_driver(cache_dir: Path) -> Iterator[SqliteDriver]:
    """The sqlite driver of a new cache directory."""
    cache_dir.mkdir()
    with ImageCache(load_settings(None, image_cache_dir=cache_dir)) as cache:
        driver = cache.driver
        assert isinstance(driver, SqliteDriver)
        yield driver


def bench_hits(root: Path, hits: int) -> tuple[float, float]:
    with _sqlite_driver(root / "hits") as driver:
        images = _add_rows(driver, 1000)
        ids = [images[n % 1000] for n in range(hits)]

        def record_all() -> None:
            for image_id in ids:
                driver.record_hit(image_id)
            driver.flush_hits()  # the last partial batch is part of the cost

        ours = _timed(record_all)
        assert sum(image.hits for image in driver.get_cached_images()) == hits
    # Glance's way, for context: connect per operation, rollback journal, commit.
    glance_db = root / "glance.db"
    with sqlite3.connect(glance_db) as conn:
        conn.execute("CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, hits INT, la REAL)")
        conn.executemany("INSERT INTO cached_images VALUES (?, 0, 0)", ((i,) for i in ids[:1000]))
    glance_hits = min(hits, 2000)

    def glance_way() -> None:
        for image_id in ids[:glance_hits]:
            conn = sqlite3.connect(glance_db, timeout=10)
            conn.execute(
                "UPDATE cached_images SET hits = hits + 1, la = ? WHERE image_id = ?",
                (time.time(), image_id),
            )
            conn.commit()
            conn.close()

    glance = _timed(glance_way)
    return hits / ours, glance_hits / glance


def bench_listing(root: Path, entries: int) -> tuple[float, float]:
    """Best of three listings: (wall seconds, CPU seconds of this process)."""
    with _sqlite_driver(root / "listing") as driver:
        _add_rows(driver, entries)
        best = (float("inf"), float("inf"))
        for _ in range(3):
            cpu = time.process_time()
            wall = time.perf_counter()
            listed = driver.get_cached_images()
            best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
            assert len(listed) == entries
        return best


def bench_prune(root: Path, entries: int) -> tuple[float, int]:
    cache_dir = root / "prune"
    cache_dir.mkdir()
    keep = entries // 10
    for n in range(entries + keep):
        (cache_dir / f"img{n:07d}").write_bytes(b"x")
    # Configure adopts the files (start-up reconciliation), one row each.
    with ImageCache(load_settings(None, image_cache_dir=cache_dir)) as cache:
        assert cache.get_cache_size() == entries + keep
        result = []
        elapsed = _timed(lambda: result.append(cache.prune(max_size=keep)))
        assert result[0].files == entries, result
        return elapsed, result[0].files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--hits", type=int, default=50_000)
    parser.add_argument("--prune", type=int, default=10_000)
    args = parser.parse_args()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="imagecache-bench-") as tmp:
        root = Path(tmp)
        hit_rate, glance_rate = bench_hits(root, args.hits)
        listing, listing_cpu = bench_listing(root, args.entries)
        prune, pruned = bench_prune(root, args.prune)
    rows = [
        ("recorded hits / s", f"{hit_rate:,.0f}", f">= {HIT_TARGET:,.0f}", hit_rate >= HIT_TARGET),
        ("  Glance's way (conn per op) / s", f"{glance_rate:,.0f}", "context", None),
        (
            f"list {args.entries:,} entries (s)",
            f"{listing:.3f}",
            f"< {LIST_TARGET}",
            listing < LIST_TARGET,
        ),
        ("  of which CPU time (s)", f"{listing_cpu:.3f}", "", None),
        (f"prune {pruned:,} entries (s)", f"{prune:.3f}", "", None),
        ("  prune rate / s", f"{pruned / prune:,.0f}", "", None),
    ]
    print(f"load average before the run: {load} on {os.cpu_count()} CPUs")
    print(f"{'metric':<34} {'value':>12}  {'target':<10} ok")
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("yes" if ok else "NO")
        print(f"{name:<34} {value:>12}  {target:<10} {mark}")


if __name__ == "__main__":
    main()
