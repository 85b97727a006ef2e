"""Edge autonomy (issue 16), on the WAN rig: a node whose central database is across a cut link.

The database is a real PostgreSQL in a rig namespace (``peers/pgns.py``),
40 ms away behind the relay; the node under test is the service in process
(``directory_app``, central driver) in the root namespace, reaching it only
across the veth link. The cut is the link's: ``Host.cut`` turns both ends'
egress into a blackhole qdisc, so packets are lost and nothing answers, no
RST, no refusal (the relay's own black hole, used on loopback by
tests/drivers/test_central_autonomy.py, keeps acknowledging bytes; this
does not). The second node sits on the database's side of the cut: it
reaches the same server by its unix socket, which no link carries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select, text

from central_autonomy import make_origin, node_driver, node_settings, partition_story, true
from imagecache import create_driver
from imagecache.drivers.central import CentralDriver, make_engine
from peers.pgns import FarPostgres
from server_helpers import directory_app, poll

pytestmark = pytest.mark.timeout(120)
ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
TIMEOUT = 1.0  # database_timeout of the nodes here
DEAD_AFTER = 2.0  # node_dead_after: the cut outlasts it


async def test_a_node_cut_from_its_far_database_serves_fills_and_rejoins(
    aiohttp_client: ClientFactory, far_postgres: FarPostgres, tmp_path: Path
) -> None:
    name = far_postgres.create_database()
    local = far_postgres.local_url(name)
    timing = {"database_timeout": TIMEOUT, "node_dead_after": DEAD_AFTER}
    settings = node_settings(tmp_path, far_postgres.url(name), "one", **timing)
    client = await aiohttp_client(directory_app(settings, make_origin(tmp_path)))
    driver = node_driver(client)
    other = create_driver(node_settings(tmp_path, local, "two", **timing))
    assert isinstance(other, CentralDriver)
    host = far_postgres.host

    def alive_for_the_cluster() -> bool:
        return any(n.alive for n in other.list_nodes() if n.url == driver.self_url)

    async def outlast_the_heartbeat_timeout() -> None:
        # The cut lasts until the cluster itself counts the node dead: its last
        # heartbeat is older than node_dead_after, as seen from the other side.
        await poll(
            lambda: true(not alive_for_the_cluster()),
            "the cut node is dead for the cluster (no heartbeat within node_dead_after)",
            within=DEAD_AFTER + 10,
        )

    try:
        assert alive_for_the_cluster()
        await partition_story(
            client,
            other,
            cut=host.cut,
            restore=host.mend,
            database_url=local,
            while_cut=outlast_the_heartbeat_timeout,
        )
        await poll(lambda: true(alive_for_the_cluster()), "the node beats again, not restarted")
    finally:
        other.close()


async def _settles(task: asyncio.Future[Any], bound: float) -> tuple[float, str]:
    """(seconds until ``task`` ended, the name of what it raised); fails past ``bound``."""
    started = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=bound)
    elapsed = time.monotonic() - started
    if not done:
        pytest.fail(f"still waiting on the database {elapsed:.1f} s after a cut ({bound} s bound)")
    failure = task.exception()
    return elapsed, type(failure).__name__ if failure is not None else ""


async def _ends_within(call: Callable[[], object], bound: float) -> tuple[float, str]:
    return await _settles(asyncio.ensure_future(asyncio.to_thread(call)), bound)


async def test_every_wait_on_a_cut_database_ends_within_the_database_timeout(
    far_postgres: FarPostgres,
) -> None:
    """A partition drops packets and answers nothing; no wait may outlast database_timeout.

    Three waits: a new connection (``connect_timeout``), a statement sent on
    an idle pooled connection (its data stays unacknowledged:
    ``tcp_user_timeout``), and a statement already sent and acknowledged
    when the link goes, waiting for an answer that never comes: nothing is
    unacknowledged then, and only TCP keepalives find the peer gone (without
    them that wait lasted until the link came back).
    """
    name = far_postgres.create_database()
    engine = make_engine(far_postgres.url(name), TIMEOUT)
    host = far_postgres.host
    waiting = engine.connect()
    idle = engine.connect()
    try:
        for conn in (waiting, idle):
            conn.execute(select(1))
        pid = waiting.execute(text("SELECT pg_backend_pid()")).scalar_one()
        in_flight = asyncio.ensure_future(
            asyncio.to_thread(waiting.execute, text("SELECT pg_sleep(3)"))
        )

        def sleeping() -> bool:
            with far_postgres.connect(name) as admin:
                row = admin.execute(
                    "SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone()
            return row is not None and "pg_sleep" in str(row[0])

        await poll(lambda: true(sleeping()), "the server runs the statement sent before the cut")
        ended: list[float] = []
        in_flight.add_done_callback(lambda _: ended.append(time.monotonic()))
        host.cut()
        cut_at = time.monotonic()
        bound = 3 * TIMEOUT + 2
        waits = {
            "idle connection": await _ends_within(lambda: idle.execute(select(1)), bound),
            "new connection": await _ends_within(lambda: engine.connect().close(), bound),
        }
        _, failure = await _settles(in_flight, bound)
        waits["in flight"] = (ended[0] - cut_at, failure)  # from the cut, not from here
        print(f"\nwaits on a cut database (database_timeout {TIMEOUT} s): {waits}")
        for what, (elapsed, failure) in waits.items():
            assert failure, f"{what}: answered across a cut link?"
            assert elapsed <= 2 * TIMEOUT + 1.5, f"{what} waited {elapsed:.1f} s ({failure})"
    finally:
        host.mend()
        for conn in (waiting, idle):
            conn.invalidate()
        engine.dispose()
