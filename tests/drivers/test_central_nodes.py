"""Several nodes over one central database: who holds what, liveness, identity, deletion.

Two (or three) drivers with their own cache directories share one database, as
the nodes of a cluster do. Staleness is produced by writing an old heartbeat
into the database, which is exactly what a node that stopped leaves behind.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from central_db import NodeFactory, age_heartbeat, central_settings, put
from imagecache import (
    BadDriverConfiguration,
    CacheStoreError,
    ImageCache,
    ImageInfo,
    create_driver,
)
from imagecache.drivers import driver_config
from imagecache.drivers.central import CentralDriver, cached_images, node_instance_id
from imagecache.drivers.sqlite import SqliteDriver
from imagecache.settings import Settings, load_settings


def test_get_cached_nodes_answers_per_image(make_node: NodeFactory) -> None:
    a, b = make_node("a"), make_node("b")
    put(a, "only-a")
    put(b, "only-b")
    put(a, "both")
    put(b, "both")
    for asker in (a, b):
        assert asker.get_cached_nodes("only-a") == [a.self_url]
        assert asker.get_cached_nodes("only-b") == [b.self_url]
        assert asker.get_cached_nodes("both") == sorted([a.self_url, b.self_url])
        assert asker.get_cached_nodes("nowhere") == []
    # Each node still sees only its own entries.
    assert [i.image_id for i in a.get_cached_images()] == ["both", "only-a"]
    assert [i.image_id for i in b.get_cached_images()] == ["both", "only-b"]
    a.delete_cached_image("both")
    assert b.get_cached_nodes("both") == [b.self_url]


def test_dead_node_is_not_offered_until_it_beats_again(make_node: NodeFactory) -> None:
    a, b = make_node("a"), make_node("b")
    put(a, "img")
    age_heartbeat(a, a.config.node_dead_after + 1)
    assert b.get_cached_nodes("img") == []
    assert [n.alive for n in b.list_nodes()] == [False, True]
    assert b.count_live_nodes() == 1
    assert a.heartbeat()
    assert b.get_cached_nodes("img") == [a.self_url]
    assert b.count_live_nodes() == 2


def test_a_second_live_node_with_the_same_url_is_refused(make_node: NodeFactory) -> None:
    a = make_node("a", url="http://127.0.0.1:9/shared")
    with pytest.raises(BadDriverConfiguration, match="already used by another live node"):
        make_node("b", url="http://127.0.0.1:9/shared/")  # the trailing slash changes nothing
    assert a.heartbeat()


def test_the_url_of_a_dead_node_can_be_taken_over(make_node: NodeFactory) -> None:
    a = make_node("a", url="http://127.0.0.1:9/shared")
    put(a, "img")
    age_heartbeat(a, a.config.node_dead_after + 1)
    b = make_node("b", url="http://127.0.0.1:9/shared")
    # a's rows described a's directory, not b's: gone with the takeover.
    assert b.get_cached_images() == []
    assert b.get_cached_nodes("img") == []
    assert not a.heartbeat()  # a learns it has been replaced


def test_the_same_node_restarting_at_once_is_let_in(make_node: NodeFactory) -> None:
    a = make_node("a")
    put(a, "img")
    restarted = make_node("a")  # same directory, same URL, heartbeat still fresh
    assert restarted.node_id == a.node_id
    assert [i.image_id for i in restarted.get_cached_images()] == ["img"]


def test_a_restarting_node_reconciles_its_own_rows_only(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    a, b = make_node("a"), make_node("b")
    for node in (a, b):
        put(node, "img")
        put(node, "resized")
    a.set_pinned("resized", True)
    (tmp_path / "a" / "img").unlink()
    (tmp_path / "a" / "resized").write_bytes(b"longer payload")
    (tmp_path / "a" / "orphan").write_bytes(b"orphan")
    now = datetime.now(UTC)
    with a.engine.begin() as conn:  # a row no request could name
        conn.execute(
            insert(cached_images).values(
                image_id="../evil",
                node_id=a.node_id,
                size=1,
                hits=0,
                last_accessed=now,
                last_modified=now,
                pinned=False,
            )
        )
    restarted = make_node("a")  # configure() reconciles
    images = {i.image_id: i for i in restarted.get_cached_images()}
    assert {i: image.size for i, image in images.items()} == {"orphan": 6, "resized": 14}
    assert images["resized"].pinned
    assert images["orphan"].hits == 0
    # b's rows describe b's directory: untouched.
    assert [(i.image_id, i.size) for i in b.get_cached_images()] == [("img", 7), ("resized", 7)]


@pytest.mark.parametrize("missing", ["database_url", "worker_self_reference_url"])
def test_missing_cluster_settings_are_named(missing: str, tmp_path: Path) -> None:
    values: dict[str, object] = {
        "image_cache_dir": tmp_path,
        "image_cache_driver": "central",
        "database_url": f"sqlite:///{tmp_path / 'c.db'}",
        "worker_self_reference_url": "http://127.0.0.1:9/x",
    }
    del values[missing]
    with pytest.raises(BadDriverConfiguration, match=missing):
        create_driver(load_settings(None, **values))


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("database_url", "mysql://db/x", "use postgresql"),
        ("database_url", "sqlite://", "SQLite file"),
        ("database_url", "not a url", "database_url is not usable"),
        ("worker_self_reference_url", "10.0.0.1:9393", "http"),
    ],
)
def test_unusable_cluster_settings_are_explained(
    setting: str, value: str, message: str, tmp_path: Path
) -> None:
    values: dict[str, object] = {
        "image_cache_dir": tmp_path,
        "image_cache_driver": "central",
        "database_url": f"sqlite:///{tmp_path / 'c.db'}",
        "worker_self_reference_url": "http://127.0.0.1:9/x",
        setting: value,
    }
    with pytest.raises(BadDriverConfiguration, match=message):
        create_driver(load_settings(None, **values))


def test_unreachable_postgres_is_a_configuration_error(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        image_cache_dir=tmp_path,
        image_cache_driver="central",
        # Port 9 (discard) on loopback: nothing speaks PostgreSQL there.
        database_url="postgresql+psycopg://127.0.0.1:9/none?connect_timeout=2",
        worker_self_reference_url="http://127.0.0.1:9/x",
    )
    with pytest.raises(BadDriverConfiguration, match="cannot use the database"):
        create_driver(settings)


def test_deletion_through_one_node_reaches_every_node(make_node: NodeFactory) -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    for node in (a, b, c):
        put(node, "img")
    put(a, "other")
    assert c.delete_everywhere("img")
    assert not c.is_cached("img")
    # Condemned copies are no longer offered, even before their nodes drop them.
    assert a.get_cached_nodes("img") == []
    assert a.apply_deletions() == ["img"]
    assert b.apply_deletions() == ["img"]
    assert not a.is_cached("img")
    assert not b.is_cached("img")
    assert a.is_cached("other")
    assert a.apply_deletions() == []
    # A copy made after the deletion is a new copy: kept and offered.
    time.sleep(0.002)  # a later timestamp than the mark, not synchronisation
    put(b, "img")
    assert b.apply_deletions() == []
    assert a.get_cached_nodes("img") == [b.self_url]


def test_timestamps_are_epoch_seconds_whatever_the_time_zone(
    central_db_url: str, tmp_path: Path
) -> None:
    """A child process in a far-off zone (host and database session) sees the same epochs."""
    script = f"""
import time
from imagecache import create_driver
from imagecache.settings import load_settings
settings = load_settings(None, image_cache_dir={str(tmp_path / "tz")!r},
    image_cache_driver="central", database_url={central_db_url!r},
    worker_self_reference_url="http://127.0.0.1:9/tz")
driver = create_driver(settings)
with driver.open_for_write("img") as target:
    target.write(b"x")
image = driver.get_cached_image("img")
print(image.last_modified - time.time(), image.last_accessed - time.time())
driver.close()
"""
    (tmp_path / "tz").mkdir()
    env = {**os.environ, "TZ": "Pacific/Kiritimati", "PGTZ": "America/Adak"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert all(abs(float(skew)) < 5 for skew in out), out

    # And read back from this process, in the host's own zone.
    reader = create_driver(
        central_settings(tmp_path / "tz", central_db_url, "http://127.0.0.1:9/tz")
    )
    try:
        image = reader.get_cached_image("img")
        assert image is not None
        assert abs(image.last_modified - time.time()) < 30
    finally:
        reader.close()


# --- adopting a single-node cache ----------------------------------------------------------------


def sqlite_settings(cache_dir: Path) -> Settings:
    return load_settings(None, image_cache_dir=cache_dir, image_cache_driver="sqlite")


def test_a_sqlite_cache_is_imported_with_hits_and_times(
    central_db_url: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "node"
    cache_dir.mkdir()
    with ImageCache(sqlite_settings(cache_dir)) as single:
        for image_id in ("a", "b", "gone"):
            assert single.cache_image_iter(image_id, [image_id.encode() * 10], ImageInfo(image_id))
        for _ in range(3):
            with single.open_for_read("a") as handle:
                handle.read()
        single.pin("b")
        before = {i.image_id: i for i in single.get_cached_images()}
    (cache_dir / "gone").unlink()  # a row whose file is missing describes nothing

    with ImageCache(central_settings(cache_dir, central_db_url)) as central:  # configure() imports
        after = {i.image_id: i for i in central.get_cached_images()}
        driver = central.driver
        assert isinstance(driver, CentralDriver)
        again = driver.import_sqlite_cache()
    assert set(after) == {"a", "b"}
    for image_id in ("a", "b"):
        old, new = before[image_id], after[image_id]
        assert new.hits == old.hits
        assert new.last_accessed == pytest.approx(old.last_accessed, abs=1e-3)
        assert new.last_modified == pytest.approx(old.last_modified, abs=1e-3)
        assert (new.hash_algo, new.hash_value, new.pinned) == (
            old.hash_algo,
            old.hash_value,
            old.pinned,
        )
    assert after["a"].hits == 3
    assert (again.imported, again.already_present, again.missing_file) == (0, 2, 1)


def test_a_glance_cache_db_is_imported(central_db_url: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "glance"
    cache_dir.mkdir()
    (cache_dir / "img").write_bytes(b"z" * 50)
    db = sqlite3.connect(cache_dir / "cache.db")
    db.execute(  # Glance's table, exactly
        "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0,"
        " last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0,"
        " checksum TEXT)"
    )
    db.execute("INSERT INTO cached_images VALUES ('img', 0, 1700000000.5, 50, 4, NULL)")
    db.commit()
    db.close()
    driver = create_driver(central_settings(cache_dir, central_db_url))
    try:
        [image] = driver.get_cached_images()
    finally:
        driver.close()
    assert (image.image_id, image.size, image.hits) == ("img", 50, 4)
    assert image.last_modified == pytest.approx(1700000000.5)
    # Never read in Glance (last_accessed 0): its age is its modification time.
    assert image.last_accessed == pytest.approx(1700000000.5)


def test_sqlite_driver_is_untouched_by_the_import(central_db_url: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "node"
    cache_dir.mkdir()
    single = SqliteDriver(driver_config(sqlite_settings(cache_dir)))
    single.configure()
    with single.open_for_write("a") as target:
        target.write(b"a")
    single.close()
    digest_before = (cache_dir / "cache.db").read_bytes()
    driver = create_driver(central_settings(cache_dir, central_db_url))
    driver.close()
    assert (cache_dir / "cache.db").read_bytes() == digest_before


# --- who reads the origin ------------------------------------------------------------------------


def test_one_node_at_a_time_claims_the_origin_read(make_node: NodeFactory) -> None:
    a, b = make_node("a"), make_node("b")
    claim = a.claim_origin_fill("img")
    assert claim is not None
    assert b.claim_origin_fill("img") is None
    assert b.origin_filler("img") == a.self_url  # whom b can follow meanwhile
    assert a.origin_filler("img") is None  # never yourself
    other = b.claim_origin_fill("other")  # claims are per image
    assert other is not None
    other.release()
    # The read is over but not yet committed: a is still the one to follow.
    claim.release()
    assert b.origin_filler("img") == a.self_url
    # Filler becomes holder in one transaction.
    put(a, "img")
    assert b.origin_filler("img") is None
    assert b.get_cached_nodes("img") == [a.self_url]
    # A node that looked before a's commit and claims after it is sent to a.
    assert b.claim_origin_fill("img") is None
    # Only when b could not fetch from a does it read the origin itself.
    again = b.claim_origin_fill("img", unreachable={a.self_url})
    assert again is not None
    again.release()


def test_a_rolled_back_fill_is_not_followed(make_node: NodeFactory) -> None:
    a, b = make_node("a"), make_node("b")
    claim = a.claim_origin_fill("img")
    assert claim is not None

    def fail_half_way() -> None:
        with a.open_for_write("img") as target:
            target.write(b"half")
            raise RuntimeError("the origin went away")

    with pytest.raises(RuntimeError):
        fail_half_way()
    claim.release()
    assert b.origin_filler("img") is None
    taken = b.claim_origin_fill("img")
    assert taken is not None
    taken.release()


def test_the_claim_of_a_dead_node_is_void(make_node: NodeFactory) -> None:
    a, b = make_node("a"), make_node("b")
    claim = a.claim_origin_fill("img")
    assert claim is not None
    if a.engine.dialect.name == "postgresql":
        # What a killed process leaves: its session closes and the lock goes with it.
        assert claim._conn is not None
        claim._conn.invalidate()
        claim._conn = None
    # Its heartbeat is still fresh: only the node that failed to reach it may step in.
    assert b.claim_origin_fill("img") is None
    taken = b.claim_origin_fill("img", unreachable={a.self_url})
    assert taken is not None
    assert a.origin_filler("img") == b.self_url
    taken.release()
    # Once its heartbeat is stale, anyone may.
    c = make_node("c")
    age_heartbeat(b, b.config.node_dead_after + 1)
    late = c.claim_origin_fill("img")
    assert late is not None
    late.release()


def test_a_node_that_leaves_is_not_offered_until_it_beats(make_node: NodeFactory) -> None:
    a, b = make_node("a"), make_node("b")
    put(a, "img")
    a.leave()
    assert b.get_cached_nodes("img") == []
    assert not a.heartbeat()  # a beat still in flight at the stop must not revive it
    assert b.get_cached_nodes("img") == []
    make_node("a")  # the same node restarted: its copies are offered again
    assert b.get_cached_nodes("img") == [a.self_url]


def test_the_whole_cluster_can_be_listed(make_node: NodeFactory) -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    put(a, "x", b"1")
    put(b, "x", b"22")
    put(b, "y", b"333")
    put(c, "z")
    age_heartbeat(c, c.config.node_dead_after + 1)
    listing = [(url, image.image_id, image.size) for url, image in a.get_cluster_images()]
    assert listing == [(a.self_url, "x", 1), (b.self_url, "x", 2), (b.self_url, "y", 3)]


def _race(base: Path, racers: int, start: Callable[[], object], spawn: Any) -> list[str]:
    """``racers`` threads or processes reading or creating ``base``'s id at once; outcomes."""
    results: Any = spawn.Queue()

    def race() -> None:
        start()
        try:
            results.put("ok " + node_instance_id(base))
        except Exception as exc:  # reported to the test, which fails with it
            results.put(f"failed {exc!r}")

    runners = [spawn.Process(target=race) for _ in range(racers)]
    for runner in runners:
        runner.start()
    outcomes = [results.get(timeout=30) for _ in runners]
    for runner in runners:
        runner.join(30)
    return outcomes


class _Threads:
    """``multiprocessing``'s shape over threads: one process, so the GIL widens the race."""

    Queue = queue.Queue

    @staticmethod
    def Process(target: Callable[[], None]) -> threading.Thread:
        return threading.Thread(target=target)


@pytest.mark.parametrize("kind", ["threads", "processes"])
def test_racers_on_a_new_directory_all_get_the_same_node_id(tmp_path: Path, kind: str) -> None:
    """Workers starting together on a new cache directory: one id, and nobody fails.

    Created empty and written after (the old way), some racer of the threads
    read it empty within a few rounds and failed ("is empty; remove it").
    """
    racers, rounds = (16, 40) if kind == "threads" else (6, 5)
    for round_ in range(rounds):
        base = tmp_path / f"cache-{round_}"
        base.mkdir()
        if kind == "threads":
            barrier = threading.Barrier(racers)
            outcomes = _race(base, racers, barrier.wait, _Threads)
        else:
            context = multiprocessing.get_context("fork")
            process_barrier = context.Barrier(racers)
            outcomes = _race(base, racers, process_barrier.wait, context)
        assert all(outcome.startswith("ok ") for outcome in outcomes), outcomes
        assert len(set(outcomes)) == 1, outcomes
        assert sorted(os.listdir(base)) == [".node-id"]  # no temporary file left behind


def test_an_image_deleted_through_another_node_during_a_fill_is_not_kept(
    make_node: NodeFactory,
) -> None:
    a, b = make_node("a"), make_node("b")

    def fill_while_a_deletes() -> None:
        with b.open_for_write("img") as target:
            target.write(b"payload")
            a.delete_everywhere("img")  # B's fill is under way on another node

    with pytest.raises(CacheStoreError, match="deleted during its fill"):
        fill_while_a_deletes()
    assert not b.is_cached("img")
    assert b.get_cached_images() == []
    assert (b.layout.invalid_dir / "img").read_bytes() == b"payload"
    # A fill that begins after the deletion is kept.
    put(b, "img")
    assert b.is_cached("img")
