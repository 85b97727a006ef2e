"""Hit latency of the central driver with its database far away, against the sqlite driver.

    PYTHONPATH=src .venv/bin/python bench/central_hits.py [--delay 0.02] [--hits 2000]

A hit here is what the image route asks of the driver: the record
(``get_cached_image``), then the file through ``open_for_read`` (which counts
the hit). The central driver reaches PostgreSQL (127.0.0.1:5432) through the
project's TCP relay with ``--delay`` seconds each way (0.02: a 40 ms round
trip). Statements sent to the database during the hits are counted with
SQLAlchemy's ``before_cursor_execute`` event. Issue 16's target: the central
driver's hit within 1.2x the sqlite driver's, no statement on a hit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from imagecache import create_driver, load_settings
from imagecache.drivers.base import Driver
from imagecache.drivers.central import CentralDriver
from peers.relay import RelayProcess

PAYLOAD = b"x" * 64 * 1024


def _hits(driver: Driver, count: int) -> list[float]:
    took = []
    for _ in range(count):
        start = time.perf_counter()
        assert driver.get_cached_image("img") is not None
        with driver.open_for_read("img") as handle:
            handle.read()
        took.append(time.perf_counter() - start)
    return took


def _report(name: str, took: list[float]) -> float:
    took.sort()
    median = statistics.median(took)
    p99 = took[int(len(took) * 0.99) - 1]
    print(f"{name:8} median {median * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us")
    return median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.02, help="one way, seconds")
    parser.add_argument("--hits", type=int, default=2000)
    args = parser.parse_args()

    name = f"imagecache_bench_{uuid.uuid4().hex[:12]}"
    admin = {"host": "127.0.0.1", "port": 5432, "dbname": "test", "autocommit": True}
    with psycopg.connect(**admin) as conn:  # type: ignore[arg-type]
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            RelayProcess(("127.0.0.1", 5432), delay=args.delay) as relay,
        ):
            base = Path(tmp)
            sqlite = create_driver(
                load_settings(None, image_cache_dir=base / "sqlite", image_cache_driver="sqlite")
            )
            central = create_driver(
                load_settings(
                    None,
                    image_cache_dir=base / "central",
                    image_cache_driver="central",
                    database_url=f"postgresql+psycopg://127.0.0.1:{relay.port}/{name}",
                    worker_self_reference_url="http://127.0.0.1:9/bench",
                )
            )
            assert isinstance(central, CentralDriver)
            for driver in (sqlite, central):
                with driver.open_for_write("img") as target:
                    target.write(PAYLOAD)
            statements: list[str] = []

            def note(_c: Any, _k: Any, statement: str, *_rest: Any) -> None:
                statements.append(statement)

            event.listen(central.engine, "before_cursor_execute", note)
            _hits(sqlite, 100)  # warm both
            _hits(central, 100)
            statements.clear()
            print(f"{args.hits} hits, database round trip {2 * args.delay * 1000:.0f} ms")
            # Alternating rounds, so a change of the machine's load falls on both.
            rounds = 10
            on_sqlite: list[float] = []
            on_central: list[float] = []
            for _ in range(rounds):
                on_sqlite += _hits(sqlite, args.hits // rounds)
                on_central += _hits(central, args.hits // rounds)
            base_median = _report("sqlite", on_sqlite)
            central_median = _report("central", on_central)
            central.flush_hits()
            print(f"central / sqlite: {central_median / base_median:.2f} (target <= 1.2)")
            print(f"database statements during the central hits: {len(statements)}")
            sqlite.close()
            central.close()
    finally:
        with psycopg.connect(**admin) as conn:  # type: ignore[arg-type]
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
