"""What only the sqlite driver does: batched hits, schema upgrades, reconciliation."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagecache import BadDriverConfiguration, Settings, create_driver
from imagecache.drivers import sqlite as sqlite_module
from imagecache.drivers.sqlite import HIT_BATCH, SCHEMA_VERSION, SqliteDriver
from imagecache.reconcile import reconcile_records
from polling import eventually_sync


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(image_cache_driver="sqlite")


@pytest.fixture
def driver(settings: Settings) -> Iterator[SqliteDriver]:
    made = create_driver(settings)
    assert isinstance(made, SqliteDriver)
    yield made
    made.close()


def cache_one(driver: SqliteDriver, image_id: str = "img") -> None:
    with driver.open_for_write(image_id) as target:
        target.write(b"data")


def hits_seen_by_another_connection(driver: SqliteDriver, image_id: str = "img") -> int:
    with sqlite3.connect(driver.db_path) as conn:
        row = conn.execute("SELECT hits FROM cached_images WHERE image_id = ?", (image_id,))
        return int(row.fetchone()[0])


def test_a_hit_reaches_other_processes_without_further_activity(driver: SqliteDriver) -> None:
    cache_one(driver)
    driver.record_hit("img")
    eventually_sync(
        lambda: hits_seen_by_another_connection(driver) == 1, "the batched hit is written"
    )


def test_a_full_batch_is_written_at_once(
    driver: SqliteDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "HIT_DELAY", 3600.0)  # the timer must not be what writes
    cache_one(driver)
    for _ in range(HIT_BATCH - 1):
        driver.record_hit("img")
    assert hits_seen_by_another_connection(driver) == 0
    driver.record_hit("img")
    assert hits_seen_by_another_connection(driver) == HIT_BATCH


def test_own_reads_and_close_see_pending_hits(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "HIT_DELAY", 3600.0)
    driver = create_driver(settings)
    assert isinstance(driver, SqliteDriver)
    cache_one(driver)
    driver.record_hit("img")
    driver.record_hit("img")
    assert driver.get_hit_count("img") == 2  # flushed before the query
    driver.record_hit("img")
    driver.close()
    assert hits_seen_by_another_connection(driver) == 3


def test_hits_of_a_deleted_image_are_dropped_quietly(
    driver: SqliteDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_module, "HIT_DELAY", 3600.0)
    cache_one(driver)
    driver.record_hit("img")
    assert driver.delete_cached_image("img")
    cache_one(driver)
    # The pending hit was written before the delete, so it went with the old
    # entry instead of landing on the new one.
    assert driver.get_hit_count("img") == 0


def test_a_glance_cache_db_is_upgraded_in_place(settings: Settings, cache_dir: Path) -> None:
    # Glance's own schema, as its sqlite driver creates it, with a never-read row.
    with sqlite3.connect(cache_dir / "cache.db") as conn:
        conn.execute(
            "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY,"
            " last_accessed REAL DEFAULT 0.0, last_modified REAL DEFAULT 0.0,"
            " size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0, checksum TEXT)"
        )
        conn.execute("INSERT INTO cached_images VALUES ('glance-img', 0, 1700000000, 4, 7, 'abc')")
    (cache_dir / "glance-img").write_bytes(b"data")
    driver = create_driver(settings)
    try:
        image = driver.get_cached_image("glance-img")
        assert image is not None
        assert (image.hits, image.size, image.checksum) == (7, 4, "abc")
        assert image.last_accessed == image.last_modified == 1700000000
        assert not image.pinned
    finally:
        driver.close()
    with sqlite3.connect(cache_dir / "cache.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused(settings: Settings, cache_dir: Path) -> None:
    with sqlite3.connect(cache_dir / "cache.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(BadDriverConfiguration, match="newer"):
        create_driver(settings)


def test_reconcile_adopts_orphans_drops_ghosts_and_fixes_sizes(
    driver: SqliteDriver, cache_dir: Path
) -> None:
    cache_one(driver, "kept")
    cache_one(driver, "ghost")
    with driver.open_for_write("resized") as target:
        target.write(b"data")  # no hash recorded: only the size can be wrong
    with driver.open_for_write("grown") as target:
        target.write(b"data")
        target.hash_algo, target.hash_value = "sha256", "ab" * 32
    driver.record_hit("resized")
    driver.set_pinned("resized", True)
    (cache_dir / "ghost").unlink()
    (cache_dir / "resized").write_bytes(b"longer data")
    (cache_dir / "grown").write_bytes(b"longer data")
    (cache_dir / "orphan").write_bytes(b"orphan")
    with sqlite3.connect(driver.db_path) as conn:
        conn.execute("INSERT INTO cached_images (image_id, size) VALUES ('../evil', 1)")
    report = reconcile_records(driver)
    assert (report.adopted, report.dropped, report.resized, report.quarantined) == (1, 2, 1, 1)
    images = {image.image_id: image for image in driver.get_cached_images()}
    assert {i: image.size for i, image in images.items()} == {"kept": 4, "orphan": 6, "resized": 11}
    # Only the size is corrected: hits and pin stay.
    resized = images["resized"]
    assert (resized.hits, resized.pinned) == (1, True)
    # A file whose recorded hash cannot match any more is not served: quarantined.
    assert (cache_dir / "invalid" / "grown").read_bytes() == b"longer data"
    assert not reconcile_records(driver).changed


def test_a_garbage_database_is_set_aside_and_rebuilt_from_the_files(
    make_settings: Callable[..., Settings], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from imagecache import ImageCache
    from imagecache.records import ScrubOutcome
    from imagecache.scrub import Scrubber

    with ImageCache(make_settings()) as cache:
        assert cache.cache_image_iter("kept", [b"k" * 5000])
    garbage = random.Random(12).randbytes(64 * 1024)
    (cache_dir / "cache.db").write_bytes(garbage)
    with ImageCache(make_settings()) as cache:
        # Started, and says so loudly; the bad file is kept aside, never an image.
        assert any(
            record.levelname == "ERROR" and "is damaged" in record.getMessage()
            for record in caplog.records
        )
        aside = [name for name in os.listdir(cache_dir) if ".corrupt-" in name]
        assert len(aside) == 1
        assert aside[0].startswith(".cache.db.corrupt-")
        assert (cache_dir / aside[0]).read_bytes() == garbage
        images = cache.get_cached_images()
        assert [(image.image_id, image.size, image.hash_value) for image in images] == [
            ("kept", 5000, None)
        ]
        # The hash it lost comes back with the next scrub.
        assert Scrubber(cache, bytes_per_second=0).verify("kept")[0] is ScrubOutcome.HASHED
        record = cache.get_cached_image("kept")
        assert record is not None
        assert record.hash_value == hashlib.sha256(b"k" * 5000).hexdigest()
