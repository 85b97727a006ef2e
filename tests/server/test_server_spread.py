"""Two pre-forked workers share a burst of connections evenly (server/spread.py).

Real processes on one listening socket; which worker served a connection is
read from the access log's pid. Connections are held open, so each round
starts from the counts the last one left.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
from pathlib import Path

from polling import eventually
from server_helpers import ServeProcess, start_serve

PROBE = "/spread-probe"  # a 404, logged like any request, apart from the health checks
_WORKER = re.compile(r"imagecache serving on \S+ with 2 worker\(s\).*\(pid (\d+)\)")
_PROBED = re.compile(r" (\d+) INFO imagecache\.access: .*path=" + re.escape(PROBE) + " ")


def _serve_command(handoff: float) -> tuple[str, ...]:
    # The hand-off delay lengthened: a peer that is merely slow to be scheduled on
    # a loaded machine is not taken for a stuck one, so the split is deterministic.
    code = (
        "import imagecache.server.spread as spread; "
        f"spread.HANDOFF_DELAY = {handoff}; "
        "from imagecache.cli import main; main()"
    )
    return (sys.executable, "-c", code)


async def _two_workers(tmp_path: Path, servers: list[ServeProcess], handoff: float) -> list[int]:
    (tmp_path / "origin").mkdir()
    server = await start_serve(
        tmp_path / "cache",
        f"directory:{tmp_path / 'origin'}",
        workers=2,
        command=_serve_command(handoff),
    )
    servers.append(server)
    # The health check answered once one worker accepts; the other may not yet.
    await eventually(
        lambda: len(set(_WORKER.findall(server.log()))) == 2,
        "both workers serve",
        detail=server.log,
    )
    return sorted(int(pid) for pid in set(_WORKER.findall(server.log())))


async def _probe(server: ServeProcess) -> asyncio.StreamWriter:
    """One connection, one answered request on it; kept open (keep-alive)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {PROBE} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404"), head
    return writer


def _served(server: ServeProcess) -> collections.Counter[int]:
    return collections.Counter(int(pid) for pid in _PROBED.findall(server.log()))


async def _logged(server: ServeProcess, probes: int) -> collections.Counter[int]:
    """Once ``probes`` probes are in the access log (written after each answer): by pid."""
    await eventually(
        lambda: sum(_served(server).values()) == probes,
        "every probe is in the access log",
        detail=server.log,
    )
    return _served(server)


async def test_a_burst_of_connections_is_split_evenly_between_two_workers(
    tmp_path: Path, servers: list[ServeProcess]
) -> None:
    pids = await _two_workers(tmp_path, servers, handoff=2.0)
    server = servers[0]
    held: list[asyncio.StreamWriter] = []
    try:
        for burst in range(1, 4):
            # All at once: the kernel queues them together, and either worker's
            # loop may wake first to find all four waiting.
            held += await asyncio.gather(*(_probe(server) for _ in range(4)))
            served = await _logged(server, 4 * burst)
            assert served == {pids[0]: 2 * burst, pids[1]: 2 * burst}, burst
    finally:
        for writer in held:
            writer.close()


async def test_a_worker_that_is_stuck_leaves_the_connections_to_the_other(
    tmp_path: Path, servers: list[ServeProcess]
) -> None:
    """A worker never yields to a peer that takes nothing: all are served, by the live one."""
    pids = await _two_workers(tmp_path, servers, handoff=0.05)
    server = servers[0]
    os.kill(pids[1], signal.SIGSTOP)
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(4):
            held.append(await asyncio.wait_for(_probe(server), 10))
        assert await _logged(server, 4) == {pids[0]: 4}
    finally:
        os.kill(pids[1], signal.SIGCONT)
        for writer in held:
            writer.close()
