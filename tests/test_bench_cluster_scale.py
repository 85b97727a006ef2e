"""bench/cluster_scale.py runs against the real PostgreSQL and reports sane numbers.

Two simulated nodes for two seconds (heartbeats every 0.5 s so the window holds
some): not a measurement, a check that the bench works and its report holds
what docs/cluster.md quotes. Skips loudly without PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

import psycopg

from central_db import PG_ADMIN_DB, PG_HOST, PG_PORT, require_postgres

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cluster_scale.py"


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cluster_scale", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_scale"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def scale_databases() -> set[str]:
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, dbname=PG_ADMIN_DB, autocommit=True, connect_timeout=3
    ) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'imagecache_scale_%'"
        ).fetchall()
    return {name for (name,) in rows}


def test_two_nodes_for_two_seconds(tmp_path: Path) -> None:
    require_postgres()
    bench = load_bench()
    out = tmp_path / "scale.json"
    level = logging.getLogger("imagecache").level
    niceness = os.getpriority(os.PRIO_PROCESS, 0)  # Linux: the calling thread's
    report = bench.main(
        [
            "--nodes",
            "2",
            "--seconds",
            "2",
            "--heartbeat-interval",
            "0.5",
            "--hit-flush-interval",
            "0.5",
            "--connections",
            "4",
            "--simulator-nice",
            "1",
            "--deletes-per-minute",  # some within the window: they go through each node's mirror
            "600",
            "--host",
            PG_HOST,
            "--port",
            str(PG_PORT),
            "--admin-db",
            PG_ADMIN_DB,
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    # Run in the test process: it must leave logging as it found it (a level
    # set here once silenced imagecache's warnings for every later test).
    assert logging.getLogger("imagecache").level == level
    # The simulator's threads were lowered, not the process that called main().
    assert os.getpriority(os.PRIO_PROCESS, 0) == niceness
    assert report["assumed_per_node"]["heartbeat_interval_s"] == 0.5
    assert report["assumed_per_node"]["per_beat"] == [
        "heartbeat",
        "count_live_nodes",
        "apply_deletions",
        "claim_preheat_items",
    ]
    (run,) = report["runs"]
    assert run["nodes"] == 2
    assert run["error_count"] == 0, run["errors"]
    assert run["ops_per_second"]["beat"] > 0
    assert run["ops_per_second"]["hit_flush"] > 0
    assert run["ops_per_second"]["delete"] > 0
    db = run["db"]
    # The driver's own transactions reached the server (reads end in rollbacks).
    assert db["transactions_sent_per_second"] > 0
    assert db["transactions_per_second"] > 0
    assert db["rollbacks_per_second"] > 0
    assert db["statement_rows_per_second"] >= db["statements_sent_per_second"] > 0
    assert 0 <= db["backend_cpu_cores"] < 2.0
    assert 0 < run["bench_cpu_cores"] < 2.0
    lookups = run["lookup_ms"]
    assert lookups["count"] > 0
    assert 0 < lookups["p50"] <= lookups["p99"] <= lookups["max"]
    assert lookups["server_samples"] > 0
    assert 0 < lookups["server_execution_p50"] <= lookups["server_execution_p99"]
    # Measured by a probe process of its own: its CPU and its waits for one are its own.
    assert 0 < lookups["probe_cpu_cores"] < 1.0
    assert lookups["probe_runqueue_wait_per_lookup"] >= 0
    assert run["connections"]["max_connections"] > 0
    assert set(run["verdict"]) >= {
        "db_cpu_under_10pct_of_a_core",
        "lookup_p99_under_5ms",
        "bench_bound",
        "kept_up",
        "fits_max_connections_without_pooler",
    }
    # Its database is dropped afterwards.
    assert run["database"] not in scale_databases()
