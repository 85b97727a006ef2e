"""Scale by simulation (issue 16): N cluster nodes against one PostgreSQL.

Each simulated node is a real ``CentralDriver`` (its own cache directory, its
own row in ``nodes``), driven at the rates a real node produces on its own;
only its start differs (``SimNode.configure``: no migration run per node, and
the engine is shared, see below). The statements are the driver's own:
``heartbeat``, ``list_nodes``, ``apply_deletions``, ``get_cached_siblings``,
``origin_filler``, ``claim_origin_fill`` (advisory lock and ``origin_fills``
row), ``_meta_commit`` through a real ``open_for_write``, ``delete_everywhere``
and ``get_cache_size``. Hit counts are written as the write-behind outbox of the
central driver writes them (branch wt-autonomy, ``outbox.py``): one transaction
per node every ``--hit-flush-interval`` seconds, a multi-row upsert of whole
rows with absolute hit counts; never one statement per hit.

Assumed per-node rates (the settings' defaults; printed with every run):

- every ``node_heartbeat_interval`` = 5 s, sequentially as ``ClusterTasks.tick``
  does: ``heartbeat`` (one UPDATE), ``count_live_nodes`` (one row, for
  ``imagecache_cluster_nodes_live``; ``--list-nodes`` lists all N rows
  instead, as the service did before 2026-12-02, the N² term the first runs
  found), ``apply_deletions``,
  then ``claim_preheat_items`` (``after_beat``: the preheat runner looks for
  this node's items; none are queued, so it finds none); the next beat is 5 s
  after this one ends;
- every ``--hit-flush-interval`` (default 5 s, the outbox drains with the
  heartbeat): one upsert of ``--hot-images`` (4) rows;
- a miss every ``--miss-interval`` seconds on average (default 60, Poisson):
  ``get_cached_siblings`` and, if nobody holds the image, ``origin_filler``
  then ``claim_origin_fill``; a node that lost the claim polls every 0.1 s
  for up to 15 s (``CLAIM_POLL_INTERVAL``, ``CLAIM_WAIT_LIMIT`` of
  upstreams/sibling.py); the fill takes ``--fill-seconds`` (2 s), during
  which an origin claim keeps its own pooled connection (the advisory lock's
  session), then commits (``_meta_commit``) and releases the claim;
- every ``prune_interval`` = 300 s: ``get_cache_size``;
- cluster-wide, ``--deletes-per-minute`` (2) ``delete_everywhere`` calls.

Connections. A real node has its own engine (``make_engine``: pool 4 + 8
overflow) and keeps at least one connection open while idle, so N real nodes
hold N to 12 N connections: with ``max_connections = 100`` the server refuses
the hundredth node or so. The simulated nodes therefore share one pool of
``--connections`` (default 40, leaving room for the others using this server),
and the run reports the schedule's lag: when the pool (or the database behind
it) cannot keep up, work starts late instead of failing. A real deployment of
more than ~90 nodes needs a pooler (pgbouncer, transaction mode would break
the session advisory locks of origin claims: session mode, or claims moved to
transaction-scoped locks) or a larger ``max_connections``.

Measured per N: transactions per second at the database (``pg_stat_database``
xact_commit + xact_rollback deltas; reads roll back), the statements the
driver sent (counted at the engine) and ``pg_stat_statements`` calls when that
extension is loaded; the CPU of the backends serving this database (utime +
stime from /proc, as a fraction of one core) and of the server's shared
processes; the bench's own CPU (2 cores is the machine: a bench near 2 is
bench-bound, not database-bound); the p50/p99 of a holder lookup
(``get_cached_siblings``) from a separate probe *process* (bench/lookup_probe.py:
a real node with its own engine and interpreter), as one real node would see
it, with its CPU and the time it waited for one (``--simulator-nice`` lowers
the priority of the simulator's threads beneath it; a probe thread in the
simulator's process measured the GIL and the run queue, not the database).

    nice .venv/bin/python bench/cluster_scale.py --nodes 100,500,1000 --seconds 30 \
        --simulator-nice 10 --json docs/results/cluster_scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import heapq
import itertools
import json
import logging
import os
import random
import resource
import selectors
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql

from imagecache import migrations
from imagecache.drivers import driver_config
from imagecache.drivers.base import Driver
from imagecache.drivers.central import CentralDriver, cached_images, make_engine
from imagecache.drivers.central.mirror import Mirror
from imagecache.drivers.central.nodes import node_instance_id, normalise_self_url
from imagecache.settings import Settings, load_settings
from imagecache.upstreams.sibling import CLAIM_POLL_INTERVAL, CLAIM_WAIT_LIMIT

SETTINGS_DEFAULTS = load_settings(None)
HEARTBEAT_INTERVAL = SETTINGS_DEFAULTS.node_heartbeat_interval
PRUNE_INTERVAL = SETTINGS_DEFAULTS.prune_interval
PROBE = Path(__file__).resolve().with_name("lookup_probe.py")
IMAGE_SIZE = 1 << 30  # rows only; the files written are a few bytes


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


class SimNode(CentralDriver):
    """A real central driver whose start skips what N nodes need not repeat.

    ``CentralDriver.configure`` would run the migrations (done once per
    database here), make an engine of its own (N engines exceed the server's
    connections, see the module docstring) and reconcile an empty directory.
    Registration is the real ``_register``.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        super().__init__(driver_config(settings))
        self._given_engine = engine

    def configure(self) -> None:
        Driver.configure(self)
        assert self.config.worker_self_reference_url is not None
        self.self_url = normalise_self_url(self.config.worker_self_reference_url)
        self._beat_lock = threading.Lock()
        self._left = False
        self._registered = False
        # The write-behind state the database calls consult (outbox.py), and
        # the local mirror a real node commits and deletes through (without it
        # every commit and deletion failed: AttributeError). The bench writes
        # the hit batches itself (flush_hits), as the outbox's drain would.
        self._init_write_behind()
        self.instance_id = node_instance_id(self.layout.base)
        self.engine = self._given_engine
        self.mirror = Mirror.over(self.config)
        self.node_id = self._register()

    def close(self) -> None:
        self.mirror.close()  # the engine is shared: disposed by the run


@dataclass
class NodeState:
    """The bench's book of one node: what it holds (image id -> hits, last_modified)."""

    driver: SimNode
    held: dict[str, list[Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def lower_priority(by: int) -> None:
    """Lower the calling thread's priority (Linux: a thread's nice is its own), not the process's.

    The simulator's threads yield the CPU to the probe process this way, and
    the importing process (a test calling ``main``) keeps its own niceness.
    """
    if by > 0:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + by)


class Scheduler:
    """Timed events run on a pool of worker threads; records how late each one started."""

    def __init__(self, workers: int, nice: int = 0) -> None:
        self._heap: list[tuple[float, int, Callable[[], None], str]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._nice = nice
        self._pool = ThreadPoolExecutor(
            workers, thread_name_prefix="node", initializer=lower_priority, initargs=(nice,)
        )
        self._stop = False
        self.lag: list[float] = []
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.measuring = False

    def at(self, when: float, kind: str, job: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), job, kind))
            self._cond.notify()

    def _run_job(self, when: float, kind: str, job: Callable[[], None]) -> None:
        start = time.monotonic()
        try:
            job()
        except Exception as exc:
            self.errors[f"{kind}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
        if self.measuring:
            self.lag.append(start - when)
            self.latency[kind].append(time.monotonic() - start)
            self.done[kind] += 1

    def loop(self) -> None:
        lower_priority(self._nice)
        while True:
            with self._cond:
                while not self._stop and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stop:
                    return
                when, _, job, kind = heapq.heappop(self._heap)
            self._pool.submit(self._run_job, when, kind, job)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._pool.shutdown(wait=True, cancel_futures=True)


class Cluster:
    """N simulated nodes and their schedules."""

    def __init__(self, args: argparse.Namespace, url: str, n: int, root: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.images = [str(uuid.UUID(int=self.rng.getrandbits(128))) for _ in range(args.images)]
        self.engine = create_engine(
            url,
            pool_size=args.connections,
            max_overflow=0,
            pool_timeout=120,
            pool_pre_ping=True,  # as make_engine: a check on every checkout, measured with it
        )
        self.statements = 0
        self.statement_rows = 0
        self.transactions = 0  # begun by the driver (SQLAlchemy's autobegin included)

        @event.listens_for(self.engine, "begin")
        def _begun(_conn: Any) -> None:
            self.transactions += 1

        @event.listens_for(self.engine, "before_cursor_execute")
        def _count(_c: Any, _cur: Any, _s: Any, params: Any, _ctx: Any, many: bool) -> None:
            self.statements += 1
            self.statement_rows += len(params) if many else 1

        base = SETTINGS_DEFAULTS.model_copy(
            update={"image_cache_driver": "central", "database_url": url}
        )
        self.nodes: list[NodeState] = []
        for i in range(n):
            settings = base.model_copy(
                update={
                    "image_cache_dir": root / f"node-{i}",
                    "worker_self_reference_url": f"http://10.{i // 250}.{i % 250}.1:9393",
                }
            )
            settings.image_cache_dir.mkdir(parents=True)  # type: ignore[union-attr]
            driver = SimNode(settings, self.engine)
            driver.configure()
            self.nodes.append(NodeState(driver))
        self._seed_holdings()
        self.sched = Scheduler(args.connections, args.simulator_nice)
        self.claim_waits: Counter[str] = Counter()

    def _seed_holdings(self) -> None:
        """Each node starts holding ``--held`` images (rows only, written in bulk)."""
        now = datetime.now(UTC)
        rows = []
        for node in self.nodes:
            for image_id in self.rng.sample(self.images, min(self.args.held, len(self.images))):
                node.held[image_id] = [0, now]
                rows.append(self._row(node, image_id))
        with self.engine.begin() as conn:
            conn.execute(postgresql.insert(cached_images), rows)

    @staticmethod
    def _row(node: NodeState, image_id: str) -> dict[str, Any]:
        hits, made = node.held[image_id]
        return {
            "image_id": image_id,
            "node_id": node.driver.node_id,
            "size": IMAGE_SIZE,
            "hits": hits,
            "last_accessed": datetime.now(UTC),
            "last_modified": made,
            "checksum": None,
            "hash_algo": None,
            "hash_value": None,
            "pinned": False,
        }

    # --- the per-node work ----------------------------------------------------------------

    def beat(self, node: NodeState) -> None:
        """``ClusterTasks.tick``: heartbeat, count_live_nodes (metrics), apply_deletions."""
        try:
            node.driver.heartbeat()
            if self.args.list_nodes:
                node.driver.list_nodes()
            else:
                node.driver.count_live_nodes()
            for image_id in node.driver.apply_deletions():
                with node.lock:
                    node.held.pop(image_id, None)
            # ClusterTasks.after_beat: PreheatRunner.tick claims this node's preheat
            # items (none are queued here: the claim finds nothing and commits).
            node.driver.claim_preheat_items(SETTINGS_DEFAULTS.prefetch_concurrency)
        finally:
            self.sched.at(
                time.monotonic() + self.args.heartbeat_interval, "beat", lambda: self.beat(node)
            )

    def flush_hits(self, node: NodeState) -> None:
        """The outbox drain: whole rows of the images hit since the last one, absolute counts."""
        try:
            with node.lock:
                hot = self.rng.sample(sorted(node.held), min(self.args.hot_images, len(node.held)))
                for image_id in hot:
                    node.held[image_id][0] += self.rng.randint(1, 20)
                rows = [self._row(node, image_id) for image_id in hot]
            if rows:
                statement = postgresql.insert(cached_images)
                statement = statement.on_conflict_do_update(
                    index_elements=[cached_images.c.image_id, cached_images.c.node_id],
                    set_={
                        k: statement.excluded[k]
                        for k in rows[0]
                        if k not in ("image_id", "node_id")
                    },
                )
                with node.driver._write() as conn:
                    conn.execute(statement, rows)
        finally:
            when = time.monotonic() + self.args.hit_flush_interval
            self.sched.at(when, "hit_flush", lambda: self.flush_hits(node))

    def miss(self, node: NodeState) -> None:
        """A miss of an image this node does not hold; the node's next miss is scheduled."""
        try:
            if self.rng.random() < self.args.new_images:
                # An image uploaded since: nobody holds it, the miss claims the origin read.
                image_id = str(uuid.UUID(int=self.rng.getrandbits(128)))
                self.images.append(image_id)
                self.look(node, image_id, time.monotonic())
                return
            with node.lock:
                free = [i for i in self.images if i not in node.held]
            if free:
                self.look(node, self.rng.choice(free), time.monotonic())
        finally:
            when = time.monotonic() + self.rng.expovariate(1 / self.args.miss_interval)
            self.sched.at(when, "miss", lambda: self.miss(node))

    def look(self, node: NodeState, image_id: str, since: float) -> None:
        """``SiblingUpstream``'s choice of a source: a holder, a filler, or the origin claim."""
        me = node.driver.self_url
        holders = [s.url for s in node.driver.get_cached_siblings(image_id) if s.url != me]
        if holders or node.driver.origin_filler(image_id) is not None:
            self.claim_waits["from_sibling"] += 1
            self._fill_later(node, image_id, None)
            return
        claim = node.driver.claim_origin_fill(image_id)
        if claim is not None:
            self.claim_waits["origin_claimed"] += 1
            self._fill_later(node, image_id, claim)
            return
        if time.monotonic() - since < CLAIM_WAIT_LIMIT:
            self.claim_waits["claim_poll"] += 1
            self.sched.at(
                time.monotonic() + CLAIM_POLL_INTERVAL,
                "miss_poll",
                lambda: self.look(node, image_id, since),
            )
            return
        self.claim_waits["gave_up_waiting"] += 1

    def _fill_later(self, node: NodeState, image_id: str, claim: Any) -> None:
        def commit() -> None:
            try:
                with node.driver.open_for_write(image_id) as fill:
                    fill.write(b"simulated image body")
                with node.lock:
                    node.held[image_id] = [0, datetime.now(UTC)]
            finally:
                if claim is not None:
                    claim.release()

        self.sched.at(time.monotonic() + self.args.fill_seconds, "fill_commit", commit)

    def prune(self, node: NodeState) -> None:
        try:
            node.driver.get_cache_size()
        finally:
            self.sched.at(time.monotonic() + PRUNE_INTERVAL, "prune", lambda: self.prune(node))

    def delete(self) -> None:
        try:
            node = self.rng.choice(self.nodes)
            with node.lock:
                held = sorted(node.held)
            if held:
                image_id = self.rng.choice(held)
                node.driver.delete_everywhere(image_id)
                with node.lock:
                    node.held.pop(image_id, None)
        finally:
            if self.args.deletes_per_minute > 0:
                gap = self.rng.expovariate(self.args.deletes_per_minute / 60)
                self.sched.at(time.monotonic() + gap, "delete", self.delete)

    def start(self) -> threading.Thread:
        now = time.monotonic()
        r = self.rng
        for node in self.nodes:  # phases spread as nodes started at different times
            self.sched.at(
                now + r.uniform(0, self.args.heartbeat_interval),
                "beat",
                functools.partial(self.beat, node),
            )
            flush = self.args.hit_flush_interval
            self.sched.at(
                now + r.uniform(0, flush), "hit_flush", functools.partial(self.flush_hits, node)
            )
            first_miss = now + r.expovariate(1 / self.args.miss_interval)
            self.sched.at(first_miss, "miss", functools.partial(self.miss, node))
            self.sched.at(
                now + r.uniform(0, PRUNE_INTERVAL), "prune", functools.partial(self.prune, node)
            )
        if self.args.deletes_per_minute > 0:
            self.sched.at(
                now + r.expovariate(self.args.deletes_per_minute / 60), "delete", self.delete
            )
        thread = threading.Thread(target=self.sched.loop, name="scheduler", daemon=True)
        thread.start()
        return thread


# --- measuring the server ------------------------------------------------------------------


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a process, in seconds; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runqueue_wait(path: str) -> float:
    """Seconds a task spent runnable but waiting for a CPU (``schedstat``); 0 if unknown.

    On a machine shared with other work this says who was starved: a bench or a
    backend that waits for a CPU as long as it runs is limited by the machine,
    not by its own work.
    """
    try:
        return int(Path(path).read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def bench_runqueue_wait() -> float:
    return sum(
        runqueue_wait(f"/proc/self/task/{tid}/schedstat") for tid in os.listdir("/proc/self/task")
    )


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


class ServerCpu:
    """CPU of the backends of one database (sampled, so short-lived ones count) and the rest."""

    BACKGROUND = ("checkpointer", "background writer", "walwriter", "autovacuum launcher")

    def __init__(self, admin: psycopg.Connection[Any], database: str) -> None:
        self.admin = admin
        self.database = database
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.background_first: dict[int, float] = {}
        self.background_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-cpu", daemon=True)
        self._lock = threading.Lock()
        self._started = False
        self.wait_first: dict[int, float] = {}
        self.wait_last: dict[int, float] = {}

    def _sample(self) -> None:
        with self._lock:
            rows = self.admin.execute(
                "SELECT pid, datname, backend_type FROM pg_stat_activity"
            ).fetchall()
        for pid, datname, backend_type in rows:
            cpu = proc_cpu(pid)
            if cpu is None:
                continue
            if datname == self.database:
                # A backend born during the run: its whole life is the run's.
                self.first.setdefault(pid, 0.0 if self._started else cpu)
                self.last[pid] = cpu
                wait = runqueue_wait(f"/proc/{pid}/schedstat")
                self.wait_first.setdefault(pid, 0.0 if self._started else wait)
                self.wait_last[pid] = wait
            elif backend_type in self.BACKGROUND or backend_type == "autovacuum worker":
                self.background_first.setdefault(pid, cpu)
                self.background_last[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def start(self) -> None:
        self._sample()
        self._started = True
        self._thread.start()

    def stop(self) -> tuple[float, float, float]:
        """(backends' CPU, shared processes' CPU, backends' wait for a CPU), in seconds."""
        self._stop.set()
        self._thread.join()
        self._sample()
        ours = sum(self.last[p] - self.first[p] for p in self.last if p in self.first)
        rest = sum(self.background_last[p] - self.background_first[p] for p in self.background_last)
        wait = sum(self.wait_last[p] - self.wait_first[p] for p in self.wait_last)
        return ours, rest, wait


def db_counters(admin: psycopg.Connection[Any], database: str) -> dict[str, int]:
    row = admin.execute(
        "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted,"
        " tup_updated, tup_deleted FROM pg_stat_database WHERE datname = %s",
        (database,),
    ).fetchone()
    assert row is not None
    names = ["xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted"]
    return dict(zip([*names, "tup_updated", "tup_deleted"], (int(v) for v in row), strict=True))


def statements_calls(conninfo: str) -> int | None:
    """Total pg_stat_statements calls in the database; None unless the server preloads it.

    Never CREATE EXTENSION when it is not preloaded: that writes ~400 catalogue
    rows and then fails to be read, which would show up in the counters measured.
    """
    try:
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=3) as conn:
            row = conn.execute("SHOW shared_preload_libraries").fetchone()
            if row is None or "pg_stat_statements" not in str(row[0]):
                return None
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            row = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()
            return int(row[0]) if row else None
    except psycopg.Error:
        return None


# --- one run ---------------------------------------------------------------------------------


class Probe:
    """bench/lookup_probe.py as a child process: a real node of its own, looking up holders.

    Its own process, so the simulated nodes' Python neither holds its GIL
    nor shares its scheduling (``--simulator-nice`` lowers the simulator's
    priority beneath it).
    """

    def __init__(self, url: str, directory: Path, images: list[str], interval: float) -> None:
        argv = [sys.executable, str(PROBE), "--url", url, "--dir", str(directory)]
        argv += ["--interval", str(interval)]
        pipe = subprocess.PIPE
        self.process = subprocess.Popen(argv, stdin=pipe, stdout=pipe, text=True)
        self._say(json.dumps(images))
        line = self._line(within=60.0)
        if line != "ready":
            self.close()
            raise RuntimeError(f"the lookup probe did not start ({line!r})")

    def _say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def _line(self, within: float) -> str:
        assert self.process.stdout is not None
        # Not select.select: with hundreds of nodes (their mirrors, their cache
        # directories) the pipe's descriptor is past FD_SETSIZE (1024).
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            readable = selector.select(within)
        return self.process.stdout.readline().strip() if readable else ""

    def measure(self) -> None:
        self._say("measure")

    def stop(self) -> dict[str, Any]:
        """Close the window; the probe's report (lookups, server times, its CPU and waits)."""
        self._say("stop")
        line = self._line(within=30.0)
        self.close()
        if not line:
            raise RuntimeError("the lookup probe sent no report")
        report: dict[str, Any] = json.loads(line)
        return report

    def close(self) -> None:
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()  # our own child, by its Popen
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def run_one(args: argparse.Namespace, n: int) -> dict[str, Any]:
    name = f"imagecache_scale_{os.getpid()}_{n}"
    conninfo = f"host={args.host} port={args.port} dbname={{}}"
    admin = psycopg.connect(conninfo.format(args.admin_db), autocommit=True, connect_timeout=5)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://{args.host}:{args.port}/{name}"
    result: dict[str, Any] = {"nodes": n, "seconds": args.seconds, "database": name}
    try:
        with tempfile.TemporaryDirectory(prefix="cluster-scale-") as tmp:
            root = Path(tmp)
            setup = make_engine(url)
            with setup.begin() as conn:
                migrations.upgrade(conn)
            setup.dispose()
            t0 = time.monotonic()
            cluster = Cluster(args, url, n, root)
            result["setup_seconds"] = round(time.monotonic() - t0, 1)
            # Closed now, so the setup's statistics reach pg_stat_database before
            # the window opens (an idle backend reports them up to 10 s late).
            cluster.engine.dispose()
            try:
                result.update(_measure(args, n, name, conninfo, admin, cluster, url, root))
            finally:
                for node in cluster.nodes:
                    node.driver.close()  # its mirror's sqlite files, before the directory goes
                cluster.engine.dispose()
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    return result


def _measure(
    args: argparse.Namespace,
    n: int,
    name: str,
    conninfo: str,
    admin: psycopg.Connection[Any],
    cluster: Cluster,
    url: str,
    root: Path,
) -> dict[str, Any]:
    prober = Probe(url, root / "probe", cluster.images, args.probe_interval)
    scheduler_thread = cluster.start()
    # Warm-up: one heartbeat interval, so every node has beaten once and pools are open.
    time.sleep(args.heartbeat_interval)
    cpu = ServerCpu(admin, name)
    before = db_counters(admin, name)
    calls_before = statements_calls(conninfo.format(name))
    statements_before, rows_before = cluster.statements, cluster.statement_rows
    transactions_before = cluster.transactions
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    busy_before = machine_busy()
    bench_wait_before = bench_runqueue_wait()
    cpu.start()
    start = time.monotonic()
    cluster.sched.measuring = True
    prober.measure()
    peak_connections = 0
    while time.monotonic() - start < args.seconds:
        time.sleep(1.0)
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (name,)
        ).fetchone()
        peak_connections = max(peak_connections, int(row[0]) if row else 0)
    probed = prober.stop()
    cluster.sched.measuring = False
    wall = time.monotonic() - start
    ours, background, backend_wait = cpu.stop()
    bench_wait = bench_runqueue_wait() - bench_wait_before
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    busy_after = machine_busy()
    after = db_counters(admin, name)
    calls_after = statements_calls(conninfo.format(name))
    statements = cluster.statements - statements_before
    statement_rows = cluster.statement_rows - rows_before
    transactions = cluster.transactions - transactions_before
    cluster.sched.stop()
    scheduler_thread.join(timeout=5)

    delta = {k: after[k] - before[k] for k in before}
    bench_cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    busy = busy_after[0] - busy_before[0]
    total = busy_after[1] - busy_before[1]
    lag = cluster.sched.lag
    max_connections = int(admin.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
    others = int(
        admin.execute(  # type: ignore[index]
            "SELECT count(*) FROM pg_stat_activity WHERE datname IS DISTINCT FROM %s"
            " AND backend_type = 'client backend'",
            (name,),
        ).fetchone()[0]
    )
    lookups, server_lookups = probed["lookups"], probed["server"]
    report: dict[str, Any] = {
        "wall_seconds": round(wall, 2),
        # The probe's lookups are in the database's counters too (one rollback each).
        "probe_lookups_per_second": round(len(lookups) / wall, 1),
        "ops_per_second": {k: round(v / wall, 1) for k, v in sorted(cluster.sched.done.items())},
        "op_ms_p50_p99": {
            k: [ms(percentile(v, 0.5)), ms(percentile(v, 0.99))]
            for k, v in sorted(cluster.sched.latency.items())
        },
        "miss_sources": dict(cluster.claim_waits),
        "errors": dict(cluster.sched.errors.most_common(5)),
        "error_count": sum(cluster.sched.errors.values()),
        "schedule_lag_ms": {
            "p50": ms(percentile(lag, 0.5)),
            "p99": ms(percentile(lag, 0.99)),
            "max": ms(max(lag) if lag else None),
        },
        "db": {
            "transactions_per_second": round(
                (delta["xact_commit"] + delta["xact_rollback"]) / wall, 1
            ),
            "commits_per_second": round(delta["xact_commit"] / wall, 1),
            "rollbacks_per_second": round(delta["xact_rollback"] / wall, 1),
            "statements_sent_per_second": round(statements / wall, 1),
            "transactions_sent_per_second": round(transactions / wall, 1),
            "statement_rows_per_second": round(statement_rows / wall, 1),
            "pg_stat_statements_calls_per_second": (
                None
                if calls_before is None or calls_after is None
                else round((calls_after - calls_before) / wall, 1)
            ),
            "tuples_returned_per_second": round(delta["tup_returned"] / wall, 1),
            "tuples_fetched_per_second": round(delta["tup_fetched"] / wall, 1),
            "tuples_written_per_second": round(
                (delta["tup_inserted"] + delta["tup_updated"] + delta["tup_deleted"]) / wall, 1
            ),
            "backend_cpu_cores": round(ours / wall, 4),
            "server_background_cpu_cores": round(background / wall, 4),
            "backend_runqueue_wait_cores": round(backend_wait / wall, 4),
        },
        "lookup_ms": {
            "count": len(lookups),
            "p50": ms(percentile(lookups, 0.5)),
            "p99": ms(percentile(lookups, 0.99)),
            "max": ms(max(lookups) if lookups else None),
            "server_execution_p50": ms(percentile(server_lookups, 0.5)),
            "server_execution_p99": ms(percentile(server_lookups, 0.99)),
            "server_samples": len(server_lookups),
            # Where a slow lookup's time went: the probe waiting for a CPU, per lookup.
            "probe_runqueue_wait_per_lookup": ms(probed["runqueue_wait_seconds"] / len(lookups))
            if lookups
            else None,
            "probe_cpu_cores": round(probed["cpu_seconds"] / wall, 4),
            # Its client CPU (SQLAlchemy, psycopg; EXPLAIN samples included), per lookup.
            "probe_cpu_per_lookup": ms(probed["cpu_seconds"] / len(lookups)) if lookups else None,
        },
        "bench_cpu_cores": round(bench_cpu / wall, 3),
        # Threads come and go a little (the executor's); counted while they lived.
        "bench_runqueue_wait_cores": round(max(0.0, bench_wait) / wall, 3),
        "machine_busy_cores": round(os.cpu_count() * busy / total, 2) if total else None,  # type: ignore[operator]
        "connections": {
            "pool_cap": args.connections,
            "peak_in_database": peak_connections,
            "max_connections": max_connections,
            "client_connections_of_others": others,
            "real_nodes_would_hold_at_least": n + 1,
            "real_nodes_could_hold_up_to": 12 * (n + 1),
        },
    }
    report["verdict"] = verdict(report, n)
    return report


def verdict(report: dict[str, Any], n: int) -> dict[str, Any]:
    db_cpu = report["db"]["backend_cpu_cores"]
    p99 = report["lookup_ms"]["p99"]
    lag_p99 = report["schedule_lag_ms"]["p99"] or 0.0
    conn = report["connections"]
    return {
        "db_cpu_under_10pct_of_a_core": db_cpu < 0.10,
        "lookup_p99_under_5ms": p99 is not None and p99 < 5.0,
        # A 2-core machine: a bench above 1.5 cores, or a machine busy above 1.8, is the limit.
        "bench_bound": report["bench_cpu_cores"] > 1.5 or (report["machine_busy_cores"] or 0) > 1.8,
        "kept_up": lag_p99 < 1000.0,
        "fits_max_connections_without_pooler": (
            conn["real_nodes_would_hold_at_least"] + conn["client_connections_of_others"]
            <= conn["max_connections"] - 3  # superuser_reserved_connections
        ),
        "nodes": n,
    }


def assumed_rates(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "heartbeat_interval_s": args.heartbeat_interval,
        "per_beat": ["heartbeat"]
        + (["list_nodes"] if args.list_nodes else ["count_live_nodes"])
        + ["apply_deletions", "claim_preheat_items"],
        "node_dead_after_s": SETTINGS_DEFAULTS.node_dead_after,
        "hit_flush_interval_s": args.hit_flush_interval,
        "hit_rows_per_flush": args.hot_images,
        "miss_interval_s_mean": args.miss_interval,
        "fill_seconds": args.fill_seconds,
        "claim_poll_interval_s": CLAIM_POLL_INTERVAL,
        "claim_wait_limit_s": CLAIM_WAIT_LIMIT,
        "prune_interval_s": PRUNE_INTERVAL,
        "deletes_per_minute_cluster": args.deletes_per_minute,
        "images_in_catalogue": args.images,
        "misses_of_new_images": args.new_images,
        "images_held_per_node_at_start": args.held,
        "probe_interval_s": args.probe_interval,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--nodes", default="100", help="comma-separated node counts, e.g. 100,500,1000")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per node count")
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=HEARTBEAT_INTERVAL,
        help="node_heartbeat_interval (the default is the setting's; the test shortens it)",
    )
    p.add_argument("--connections", type=int, default=40, help="the simulated nodes' shared pool")
    p.add_argument(
        "--hit-flush-interval",
        type=float,
        default=HEARTBEAT_INTERVAL,
        help="seconds between a node's write-behind upserts of hit counts",
    )
    p.add_argument("--hot-images", type=int, default=4, help="rows per hit upsert")
    p.add_argument("--miss-interval", type=float, default=60.0, help="mean seconds between misses")
    p.add_argument("--fill-seconds", type=float, default=2.0, help="how long a fill takes")
    p.add_argument("--deletes-per-minute", type=float, default=2.0, help="cluster-wide")
    p.add_argument(
        "--new-images",
        type=float,
        default=0.2,
        help="fraction of misses that are of an image nobody holds yet (an origin claim)",
    )
    p.add_argument("--images", type=int, default=200, help="images in the catalogue")
    p.add_argument("--held", type=int, default=10, help="images each node holds at the start")
    p.add_argument("--probe-interval", type=float, default=0.05, help="seconds between lookups")
    p.add_argument(
        "--simulator-nice",
        type=int,
        default=0,
        help="lower the priority of the simulator's threads by this much (per thread; the "
        "probe keeps its own, as a real node on its own host would)",
    )
    p.add_argument(
        "--list-nodes",
        action="store_true",
        help="list every node at each beat (the service before it counted them)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5432)
    p.add_argument("--admin-db", default="postgres", help="database to CREATE/DROP from")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the report here as well")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    counts = [int(v) for v in args.nodes.split(",") if v.strip()]
    report: dict[str, Any] = {
        "bench": "cluster_scale",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "assumed_per_node": assumed_rates(args),
        "connections_note": (
            "simulated nodes share one pool of --connections; a real node keeps its own pool "
            "(4 + 8 overflow, at least one open while idle), so more than ~90 real nodes exceed "
            "max_connections=100: a pooler (pgbouncer, session mode for the advisory locks) "
            "or more max_connections is needed"
        ),
        "runs": [],
    }
    print(json.dumps({"assumed_per_node": report["assumed_per_node"]}, indent=1), flush=True)
    for n in counts:
        run = run_one(args, n)
        report["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    # Here, not in main(): tests call main() in their own process, and a logger
    # level set there silenced imagecache's warnings for every later test.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("imagecache").setLevel(logging.ERROR)  # deletions log per node
    main(sys.argv[1:])
