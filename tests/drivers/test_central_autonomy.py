"""A central-driver node without its database: hits never ask it, and the node goes on.

Real parts throughout: PostgreSQL at 127.0.0.1:5432 (``central_db``), reached
by the node under test through the project's TCP relay (``peers/relay.py``),
which cuts it the way a partition does: ``blackhole()`` stops every byte
(new connections are accepted by the kernel and then hang) and ``reset()``
breaks the connections already open. A second node, when one is needed,
talks to PostgreSQL directly, as a node on the other side of the cut would.
Statements are counted with SQLAlchemy's ``before_cursor_execute`` event on
the node's own engine: every statement the driver sends passes there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from central_autonomy import (
    DATA,
    central_rows,
    count_statements,
    download,
    make_origin,
    node_driver,
    node_settings,
    partition_story,
    put,
    true,
)
from central_db import PG_HOST, PG_PORT
from imagecache import BadDriverConfiguration, create_driver
from imagecache.drivers.central import CentralDriver
from imagecache.server.cluster import CLUSTER_TASKS
from peers.relay import RelayProcess
from server_helpers import directory_app, poll, settled

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    return make_origin(tmp_path)


@pytest.fixture
def relay() -> Iterator[RelayProcess]:
    with RelayProcess((PG_HOST, PG_PORT)) as process:
        yield process


def through(relay: RelayProcess, database_url: str) -> str:
    """The same database, reached through the relay."""
    name = database_url.rsplit("/", 1)[1]
    return f"postgresql+psycopg://127.0.0.1:{relay.port}/{name}"


def cut(relay: RelayProcess) -> None:
    relay.blackhole()  # no byte flows, new connections hang...
    relay.reset()  # ...and the open ones (the pool's) are broken


# --- the hit path ----------------------------------------------------------------------------


async def test_a_hit_sends_no_database_statement(
    aiohttp_client: ClientFactory, fresh_postgres_url: str, tmp_path: Path, origin: Path
) -> None:
    settings = node_settings(tmp_path, fresh_postgres_url, "one", node_heartbeat_interval=3600)
    client = await aiohttp_client(directory_app(settings, origin))
    tasks = client.app[CLUSTER_TASKS]
    await poll(lambda: true(tasks.beats >= 1), "the first heartbeat has run")
    await download(client, "a")  # the miss: claims, commit, all in the database
    await settled(client)
    driver = node_driver(client)
    statements = count_statements(driver)

    for _ in range(50):
        await download(client, "a")
    driver.flush_hits()  # the batch is written too, locally
    assert driver.get_hit_count("a") == 50
    assert statements == [], f"{len(statements)} statements on the hit path: {statements[:3]}"

    # The hits reach the database with the next heartbeat, off the request path.
    await tasks.tick()
    assert statements, "the heartbeat writes to the database (the counter counts)"
    assert central_rows(fresh_postgres_url, driver.node_id)["a"] == (len(DATA["a"]), 50)


# --- the database cut ------------------------------------------------------------------------


async def test_a_node_cut_from_its_database_serves_fills_and_rejoins(
    aiohttp_client: ClientFactory,
    fresh_postgres_url: str,
    relay: RelayProcess,
    tmp_path: Path,
    origin: Path,
) -> None:
    settings = node_settings(tmp_path, through(relay, fresh_postgres_url), "one")
    client = await aiohttp_client(directory_app(settings, origin))
    other = create_driver(node_settings(tmp_path, fresh_postgres_url, "two"))
    assert isinstance(other, CentralDriver)
    try:
        await partition_story(
            client,
            other,
            cut=lambda: cut(relay),
            restore=lambda: _restored(relay),
            database_url=fresh_postgres_url,
        )
    finally:
        other.close()


def _restored(relay: RelayProcess) -> None:
    relay.restore()


def test_the_outbox_outlives_a_restart(
    fresh_postgres_url: str, relay: RelayProcess, tmp_path: Path
) -> None:
    settings = node_settings(tmp_path, through(relay, fresh_postgres_url), "one")
    driver = create_driver(settings)
    assert isinstance(driver, CentralDriver)
    node_id = driver.node_id
    put(driver, "a")
    cut(relay)
    put(driver, "b")  # committed locally, queued
    with driver.open_for_read("b") as handle:
        handle.read()
    assert driver.delete_cached_image("a")  # a deletion, queued too
    assert driver.offline
    assert driver.mirror.depth() == 2
    driver.close()

    relay.restore()
    again = create_driver(settings)
    try:
        assert isinstance(again, CentralDriver)
        assert again.mirror.depth() == 0
        assert central_rows(fresh_postgres_url, node_id) == {"b": (len(DATA["b"]), 1)}
    finally:
        again.close()


def test_a_known_node_starts_without_its_database_and_joins_later(
    fresh_postgres_url: str, relay: RelayProcess, tmp_path: Path
) -> None:
    settings = node_settings(tmp_path, through(relay, fresh_postgres_url), "one")
    driver = create_driver(settings)
    assert isinstance(driver, CentralDriver)
    put(driver, "a")
    driver.close()

    cut(relay)
    with pytest.raises(BadDriverConfiguration, match="cannot use the database"):
        create_driver(node_settings(tmp_path, through(relay, fresh_postgres_url), "new"))
    offline = create_driver(settings)  # it has joined before: it starts
    try:
        assert isinstance(offline, CentralDriver)
        assert offline.offline
        assert offline.get_cached_image("a") is not None
        put(offline, "b")
        assert offline.sync() == []  # still away: nothing, quietly
        relay.restore()
        assert offline.sync() == []
        assert not offline.offline
        assert offline.mirror.depth() == 0
        rows = central_rows(fresh_postgres_url, offline.node_id)
        assert set(rows) == {"a", "b"}
    finally:
        offline.close()


def test_a_deletion_during_an_offline_fill_wins_when_the_database_returns(
    fresh_postgres_url: str, relay: RelayProcess, tmp_path: Path
) -> None:
    driver = create_driver(node_settings(tmp_path, through(relay, fresh_postgres_url), "one"))
    other = create_driver(node_settings(tmp_path, fresh_postgres_url, "two"))
    assert isinstance(driver, CentralDriver)
    assert isinstance(other, CentralDriver)
    try:
        cut(relay)
        with driver.open_for_write("d") as target:
            target.write(DATA["d"])
            other.delete_everywhere("d")  # after this fill began, through a node that can
        assert driver.is_cached("d")  # kept locally for now: nobody could say otherwise
        relay.restore()
        driver.sync()
        assert not driver.is_cached("d")
        assert driver.get_cached_image("d") is None
        assert central_rows(fresh_postgres_url, driver.node_id) == {}
        # A fill after the deletion is kept.
        put(driver, "d")
        driver.sync()
        assert driver.is_cached("d")
        assert set(central_rows(fresh_postgres_url, driver.node_id)) == {"d"}
    finally:
        other.close()
        driver.close()


async def test_claims_are_skipped_while_the_database_is_away(
    fresh_postgres_url: str, relay: RelayProcess, tmp_path: Path
) -> None:
    driver = create_driver(node_settings(tmp_path, through(relay, fresh_postgres_url), "one"))
    assert isinstance(driver, CentralDriver)
    try:
        cut(relay)
        claim = await asyncio.to_thread(driver.claim_origin_fill, "a")
        assert claim is not None  # read the origin alone
        claim.release()
        assert driver.offline
    finally:
        driver.close()


def test_the_first_start_with_a_mirror_keeps_the_databases_records(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    """Upgrading from a release without the mirror: the database's rows seed it."""
    settings = node_settings(tmp_path, fresh_postgres_url, "one")
    driver = create_driver(settings)
    assert isinstance(driver, CentralDriver)
    put(driver, "a")
    for _ in range(3):
        with driver.open_for_read("a") as handle:
            handle.read()
    assert driver.set_pinned("a", True)
    driver.close()
    before = central_rows(fresh_postgres_url, driver.node_id)
    for side in (tmp_path / "one").glob(".central.db*"):
        side.unlink()  # as a directory of the previous release has none

    again = create_driver(settings)
    try:
        image = again.get_cached_image("a")
        assert image is not None
        assert (image.hits, image.pinned) == (3, True)
        assert central_rows(fresh_postgres_url, driver.node_id) == before == {"a": (200_000, 3)}
    finally:
        again.close()


def test_clearing_many_images_reaches_the_database_in_batches(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    driver = create_driver(node_settings(tmp_path, fresh_postgres_url, "one"))
    assert isinstance(driver, CentralDriver)
    try:
        for i in range(1200):
            (tmp_path / "one" / f"img-{i}").write_bytes(b"x")
        driver.close()
        driver = create_driver(node_settings(tmp_path, fresh_postgres_url, "one"))  # adopts them
        assert isinstance(driver, CentralDriver)
        assert len(central_rows(fresh_postgres_url, driver.node_id)) == 1200
        assert driver.delete_all_cached_images() == 1200
        assert central_rows(fresh_postgres_url, driver.node_id) == {}
        assert driver.mirror.depth() == 0
    finally:
        driver.close()


async def test_a_database_lost_part_way_through_a_beat_is_a_warning_not_a_traceback(
    aiohttp_client: ClientFactory,
    fresh_postgres_url: str,
    relay: RelayProcess,
    tmp_path: Path,
    origin: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The beat's sync answers, then the link goes before the work after it (preheat claims).

    Seen in the WAN soak's database cuts: that work's CacheStoreError left the
    beat as "cluster heartbeat failed" with a traceback, as if it were a bug.
    """
    settings = node_settings(tmp_path, through(relay, fresh_postgres_url), "one")
    client = await aiohttp_client(directory_app(settings, origin))
    tasks = client.app[CLUSTER_TASKS]
    cuts: list[int] = []

    async def cut_once_after_the_sync() -> None:
        if not cuts:
            cuts.append(tasks.beats)
            await asyncio.to_thread(cut, relay)

    tasks.after_beat.insert(0, cut_once_after_the_sync)  # before the preheat runner's claim

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "imagecache.server.cluster"]

    try:
        with caplog.at_level(logging.WARNING, logger="imagecache.server.cluster"):
            await poll(lambda: true(bool(said())), "the cut beat is reported", within=15)
        [record] = said()[:1]
        assert record.exc_info is None, f"a traceback for a lost database: {record.message}"
        assert "cut short" in record.getMessage()
    finally:
        _restored(relay)
    driver = node_driver(client)
    await poll(lambda: true(not driver.offline), "the node rejoins at a later beat")
