"""The WAN soak's central database across the rig: its link cut in waves, and the end checks.

tests/wan/test_soak_wan.py's ``[central]`` variant reaches a PostgreSQL in a
rig namespace (``peers/pgns.py``, 40 ms away) over a veth link, and cuts that
link for real (``Host.cut``: a blackhole qdisc, packets lost) in every wave,
at an offset that moves from wave to wave so the database goes away while
the origin is up, with it, and as it comes back. ``DatabaseCuts`` runs those
cuts and sees each one felt (the node's readiness says its database is
away); ``check_rejoined`` is issue 16's end of the story, with no restart:
the node ready again, its outbox empty, the central rows its disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from peers import free_port
from peers.pgns import FarPostgres
from peers.wan import WanRig
from polling import eventually

DATABASE_TIMEOUT = 1.0  # the node's database_timeout: a cut of DB_CUT outlasts it
HEARTBEAT = 0.5
DB_CUT = 3.0  # seconds the database link stays cut in each wave
DB_OFFSETS = (0.0, 1.5, 3.0)  # from the wave's start: origin up, cut with it, restoring
# The server's side of a partition. A connection the node gives up on during a
# cut (its pool invalidates it, its kernel aborts it after tcp_user_timeout)
# tells the server nothing, its FIN lost: the backend stays, idle, until the
# server's own keepalives find the peer gone (two hours by default). With the
# soak's twelve cuts the first run ran out of connections ("sorry, too many
# clients already") and the node never came back. A deployment needs the same
# settings on its database; the node is reached without the relay for them to
# work (the relay would be the server's peer, and never goes away).
FAR_SETTINGS = {
    "tcp_keepalives_idle": "2",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
    "max_connections": "100",
}
READY_IN_A_ROW = 8  # answers: both workers (connections are spread over them) say ready


async def _readiness(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """(HTTP status of /healthcheck/ready, its checks)."""
    async with session.get(url + "/healthcheck/ready") as response:
        body = await response.json()
    return response.status, body["checks"]


@dataclass
class Database:
    """The driver's settings, and the far PostgreSQL (and database) of the central driver."""

    env: dict[str, str]
    port: int = 0  # the service's (0: any free one)
    far: FarPostgres | None = None
    name: str = ""


@contextlib.contextmanager
def far_database(rig: WanRig) -> Iterator[Database]:
    """A PostgreSQL on its own rig host (``FAR_SETTINGS``), a database in it, a node's env."""
    far = FarPostgres(rig.add_host("db"), settings=FAR_SETTINGS)
    try:
        name = far.create_database()
        port = free_port()
        env = {
            "IMAGECACHE_IMAGE_CACHE_DRIVER": "central",
            "IMAGECACHE_DATABASE_URL": far.direct_url(name),
            # A central node is its URL: one service, two workers, one port.
            "IMAGECACHE_WORKER_SELF_REFERENCE_URL": f"http://127.0.0.1:{port}",
            "IMAGECACHE_DATABASE_TIMEOUT": str(DATABASE_TIMEOUT),
            "IMAGECACHE_NODE_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        }
        yield Database(env, port, far, name)
    finally:
        far.stop()


@dataclass
class DatabaseCuts:
    """The database's link, cut ``DB_CUT`` seconds in each wave; how long each took to be felt."""

    far: FarPostgres
    session: aiohttp.ClientSession
    url: str
    felt_after: list[float] = field(default_factory=list)

    async def wave(self, wave: int) -> None:
        await asyncio.sleep(DB_OFFSETS[wave % len(DB_OFFSETS)])
        await asyncio.to_thread(self.far.host.cut)
        cut_at = time.monotonic()
        try:

            async def away() -> bool:
                _, checks = await _readiness(self.session, self.url)
                return not checks["database"]["ok"]

            # The node finds out by its heartbeat (each bounded by database_timeout).
            what = f"wave {wave}: the node knows its database is away"
            await eventually(away, what, within=15, interval=0.1)
            self.felt_after.append(round(time.monotonic() - cut_at, 1))
            await asyncio.sleep(max(0.0, DB_CUT - (time.monotonic() - cut_at)))
        finally:
            await asyncio.to_thread(self.far.host.mend)


def _mirror(cache_dir: Path, query: str) -> list[tuple[object, ...]]:
    """Rows of the node's local mirror (``.central.db``), read by a connection of our own."""
    conn = sqlite3.connect(f"file:{cache_dir / '.central.db'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(query).fetchall()
    finally:
        conn.close()


async def check_rejoined(
    session: aiohttp.ClientSession,
    url: str,
    far: FarPostgres,
    dbname: str,
    cache_dir: Path,
    disk: dict[str, int],
) -> dict[str, tuple[int, int]]:
    """With the links mended and the load over: ready again, outbox empty, rows = disk.

    ``disk`` is ``{image_id: size}`` of what the cache directory holds. The
    central rows are read over the database's unix socket (not the link)
    and must be the disk's images, each with the size and hits the node's
    mirror has. Returns the central rows.
    """
    in_a_row = 0
    not_ready: list[dict[str, Any]] = []

    async def ready() -> bool:
        nonlocal in_a_row
        status, checks = await _readiness(session, url)
        in_a_row = in_a_row + 1 if status == 200 else 0
        if status != 200:
            not_ready[:] = [checks]
        return in_a_row >= READY_IN_A_ROW

    what = "the node is ready again, in every worker"
    await eventually(ready, what, within=30, interval=0.1, detail=lambda: not_ready)

    async def outbox_empty() -> bool:
        [(depth,)] = await asyncio.to_thread(_mirror, cache_dir, "SELECT COUNT(*) FROM outbox")
        return depth == 0

    await eventually(outbox_empty, "the node's outbox is drained", within=30, interval=0.1)
    [(node_id,)] = _mirror(cache_dir, "SELECT node_id FROM identity")
    seen: dict[str, dict[str, tuple[int, int]]] = {}

    def central() -> list[tuple[object, ...]]:
        with far.connect(dbname) as conn:
            return conn.execute(
                "SELECT image_id, size, hits FROM cached_images WHERE node_id = %s", (node_id,)
            ).fetchall()

    async def rows_are_the_disk() -> bool:
        rows = await asyncio.to_thread(central)
        query = "SELECT image_id, size, hits FROM cached_images"
        local = await asyncio.to_thread(_mirror, cache_dir, query)
        seen["central"] = {str(i): (int(s), int(h)) for i, s, h in rows}  # type: ignore[call-overload]
        seen["mirror"] = {str(i): (int(s), int(h)) for i, s, h in local}  # type: ignore[call-overload]
        sizes = {i: size for i, (size, _) in seen["central"].items()}
        return sizes == disk and seen["central"] == seen["mirror"]

    what = "the central rows are the node's disk, with the mirror's hits"
    await eventually(
        rows_are_the_disk, what, within=30, interval=0.2, detail=lambda: f"disk {disk}, {seen}"
    )
    return seen["central"]
