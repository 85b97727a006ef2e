"""The central schema's Alembic migrations, on SQLite and on the real PostgreSQL.

Fresh database to head, an upgrade from revision 1 that keeps its rows, an
idempotent re-run, and several nodes migrating one empty database at once.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text

from central_db import central_settings, unique_node_url
from imagecache import create_driver
from imagecache.drivers.central import CentralDriver, make_engine, node_instance_id
from imagecache.migrations import alembic_config, current_revision, head_revision, upgrade


def test_fresh_database_is_migrated_to_head(central_db_url: str, tmp_path: Path) -> None:
    driver = create_driver(central_settings(tmp_path / "cache", central_db_url))
    try:
        with driver.engine.connect() as conn:  # type: ignore[attr-defined]
            assert current_revision(conn) == head_revision() == "r0005"
            tables = set(inspect(conn).get_table_names())
            columns = {c["name"] for c in inspect(conn).get_columns("cached_images")}
            node_columns = {c["name"] for c in inspect(conn).get_columns("nodes")}
    finally:
        driver.close()
    assert {"nodes", "cached_images", "deleted_images", "origin_fills"} <= tables
    assert {"preheat_jobs", "preheat_items"} <= tables
    assert "site" in node_columns
    assert {"image_id", "node_id", "hits", "pinned", "hash_algo", "hash_value"} <= columns


def test_upgrade_from_revision_1_keeps_rows(central_db_url: str, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "old-image").write_bytes(b"x" * 123)
    node_url = unique_node_url()
    accessed = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    modified = datetime(2024, 12, 31, 23, 0, 0, tzinfo=UTC)

    engine = make_engine(central_db_url)
    with engine.begin() as conn:
        upgrade(conn, "r0001")
    with engine.begin() as conn:
        assert current_revision(conn) == "r0001"
        assert "deleted_images" not in inspect(conn).get_table_names()
        # The node as a revision-1 imagecache on this directory left it: stale heartbeat.
        conn.execute(
            text(
                "INSERT INTO nodes (url, instance_id, heartbeat, started)"
                " VALUES (:url, :instance, :beat, :beat)"
            ),
            {"url": node_url, "instance": node_instance_id(cache_dir), "beat": modified},
        )
        node_id = conn.execute(text("SELECT id FROM nodes")).scalar_one()
        conn.execute(
            text(
                "INSERT INTO cached_images (image_id, node_id, size, hits, last_accessed,"
                " last_modified, checksum) VALUES ('old-image', :node, 123, 7, :acc, :mod, :sum)"
            ),
            {"node": node_id, "acc": accessed, "mod": modified, "sum": "0" * 32},
        )
    engine.dispose()

    driver = create_driver(central_settings(cache_dir, central_db_url, node_url))
    try:
        assert isinstance(driver, CentralDriver)
        with driver.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
        [image] = driver.get_cached_images()
        assert driver.get_cached_nodes("old-image") == [node_url]
    finally:
        driver.close()
    assert image.image_id == "old-image"
    assert image.hits == 7
    assert image.size == 123
    assert image.checksum == "0" * 32
    assert image.last_accessed == pytest.approx(accessed.timestamp(), abs=1e-3)
    assert image.last_modified == pytest.approx(modified.timestamp(), abs=1e-3)
    assert image.pinned is False
    assert image.hash_algo is None


def test_upgrade_from_revision_3_keeps_rows_and_gives_nodes_no_site(
    central_db_url: str, tmp_path: Path
) -> None:
    """r0004 adds ``nodes.site`` and keys claims by site: existing rows get '' (no site)."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "kept").write_bytes(b"y" * 10)
    node_url = unique_node_url()
    other_url = unique_node_url()
    beat = datetime(2025, 6, 1, tzinfo=UTC)

    engine = make_engine(central_db_url)
    with engine.begin() as conn:
        upgrade(conn, "r0003")
    with engine.begin() as conn:
        assert "site" not in {c["name"] for c in inspect(conn).get_columns("nodes")}
        for url, instance in ((node_url, node_instance_id(cache_dir)), (other_url, "other")):
            conn.execute(
                text(
                    "INSERT INTO nodes (url, instance_id, heartbeat, started)"
                    " VALUES (:url, :instance, :beat, :beat)"
                ),
                {"url": url, "instance": instance, "beat": beat},
            )
        node_id = conn.execute(
            text("SELECT id FROM nodes WHERE url = :url"), {"url": node_url}
        ).scalar_one()
        conn.execute(
            text(
                "INSERT INTO cached_images (image_id, node_id, size, hits, last_accessed,"
                " last_modified, pinned) VALUES ('kept', :node, 10, 3, :t, :t, true)"
            ),
            {"node": node_id, "t": beat},
        )
        # A claim in flight (of the other node) while the upgrade runs.
        conn.execute(
            text(
                "INSERT INTO origin_fills (image_id, node_id, started)"
                " SELECT 'inflight', id, :t FROM nodes WHERE url = :url"
            ),
            {"t": beat, "url": other_url},
        )
    engine.dispose()

    # The node comes back with the new release, now labelled: its row takes the label.
    driver = create_driver(central_settings(cache_dir, central_db_url, node_url, site="dc-2"))
    try:
        assert isinstance(driver, CentralDriver)
        with driver.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            sites = {url: site for url, site in conn.execute(text("SELECT url, site FROM nodes"))}
            claims = conn.execute(
                text(
                    "SELECT f.image_id, f.site, n.url FROM origin_fills AS f"
                    " JOIN nodes AS n ON n.id = f.node_id"
                )
            ).all()
        [image] = driver.get_cached_images()
        assert driver.get_cached_nodes("kept") == [node_url]
        assert {n.url: n.site for n in driver.list_nodes()} == sites
    finally:
        driver.close()
    assert sites == {node_url: "dc-2", other_url: ""}  # the node not restarted: no site
    assert [tuple(row) for row in claims] == [("inflight", "", other_url)]  # claims: no site
    assert (image.image_id, image.hits, image.size, image.pinned) == ("kept", 3, 10, True)


def test_rerunning_the_upgrade_changes_nothing(central_db_url: str, tmp_path: Path) -> None:
    settings = central_settings(tmp_path / "cache", central_db_url)
    driver = create_driver(settings)
    with driver.open_for_write("img") as target:
        target.write(b"data")
    before = driver.get_cached_images()
    driver.close()

    engine = make_engine(central_db_url)
    for _ in range(2):
        with engine.begin() as conn:
            upgrade(conn)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
    engine.dispose()

    again = create_driver(settings)  # the same node restarting: migrates (nothing) again
    try:
        assert again.get_cached_images() == before
    finally:
        again.close()


def test_nodes_starting_together_migrate_once(fresh_postgres_url: str, tmp_path: Path) -> None:
    """Without the advisory lock the racing CREATE TABLEs of an empty database collide."""
    errors: list[BaseException] = []
    drivers = []
    start = threading.Barrier(4)

    def start_node(n: int) -> None:
        settings = central_settings(tmp_path / f"cache{n}", fresh_postgres_url)
        start.wait()
        try:
            drivers.append(create_driver(settings))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_node, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    try:
        assert not errors, errors
        assert len(drivers) == 4
        assert len({d.node_id for d in drivers}) == 4  # type: ignore[attr-defined]
    finally:
        for driver in drivers:
            driver.close()


def test_r0004_downgrades_to_r0003_and_back(central_db_url: str) -> None:
    """Back to one claim per image (the oldest), nodes without sites; then up again."""
    engine = make_engine(central_db_url)
    try:
        with engine.begin() as conn:
            upgrade(conn)
            beat = datetime(2025, 6, 1, tzinfo=UTC)
            for n, site in enumerate(("a", "b")):
                conn.execute(
                    text(
                        "INSERT INTO nodes (url, instance_id, heartbeat, started, site)"
                        " VALUES (:url, 'i', :t, :t, :site)"
                    ),
                    {"url": f"http://127.0.0.1:9/{site}", "t": beat, "site": site},
                )
                conn.execute(
                    text(
                        "INSERT INTO origin_fills (image_id, site, node_id, started)"
                        " SELECT 'img', site, id, :t FROM nodes WHERE site = :site"
                    ),
                    {"site": site, "t": beat.replace(second=n)},
                )
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "r0003")
        with engine.begin() as conn:
            assert current_revision(conn) == "r0003"
            assert "site" not in {c["name"] for c in inspect(conn).get_columns("nodes")}
            kept = conn.execute(
                text(
                    "SELECT f.image_id, n.url FROM origin_fills AS f"
                    " JOIN nodes AS n ON n.id = f.node_id"
                )
            ).all()
            assert [tuple(row) for row in kept] == [("img", "http://127.0.0.1:9/a")]
        with engine.begin() as conn:
            upgrade(conn)
        with engine.begin() as conn:
            assert current_revision(conn) == head_revision()
    finally:
        engine.dispose()
