"""What the soaks check of the service's processes: descriptors, RSS, a clean stop.

Shared by tests/test_soak.py and tests/wan/test_soak_wan.py: the same bounds
for every soak, so "flat" means one thing (the slack constants say why each
is what it is).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from server_helpers import ServeProcess

OTHER_FD_SLACK = 4  # fills in flight as the sample is taken (see check_descriptors)
SOCKET_SLACK = 40
RSS_SLACK_MIB = 24  # allocator arenas settle within it (the load run in bench/ shows the same)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass(frozen=True)
class Descriptors:
    """Open descriptors of a process (or several, added up), by what they are."""

    database: int = 0  # the sqlite database and its WAL
    sockets: int = 0
    other: int = 0  # cache files, pipes, eventfds

    def __add__(self, more: Descriptors) -> Descriptors:
        return Descriptors(
            self.database + more.database, self.sockets + more.sockets, self.other + more.other
        )


def descriptors_of(pid: int) -> Descriptors:
    database = sockets = other = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
        if os.path.basename(target).startswith("cache.db"):
            database += 1
        elif target.startswith("socket:"):
            sockets += 1
        else:
            other += 1
    return Descriptors(database, sockets, other)


def exit_status(pid: int) -> int | None:
    """A dead but unreaped process's exit status (waitpid's form decoded), else None.

    The status is field 52 of ``/proc/PID/stat`` (Linux 3.5+); the fields after
    the command name, which may hold spaces, start at field 3.
    """
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return None
    if fields[0] != "Z":
        return None
    return os.waitstatus_to_exitcode(int(fields[52 - 3]))


def service_pids(servers: list[ServeProcess]) -> list[int]:
    """The server processes and their forked workers (``--workers N``), all alive."""
    pids = []
    for server in servers:
        pid = server.process.pid
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            pids += [pid, *map(int, children.read().split())]
    for pid in pids:
        status = exit_status(pid)
        # A zombie has no VmRSS; say what happened instead of "no VmRSS".
        assert status is None, f"worker {pid} exited with status {status}"
    return pids


def usage(servers: list[ServeProcess]) -> tuple[Descriptors, int]:
    """(open descriptors, RSS in KiB) of the server processes together."""
    pids = service_pids(servers)
    return sum(map(descriptors_of, pids), Descriptors()), sum(map(rss_kib, pids))


def check_descriptors(samples: list[Descriptors]) -> None:
    """No kind of descriptor grows with the waves (``samples``: one after each).

    The lowest of the last five samples against the highest of the first
    half: what comes and goes with load has its bursts in both, a leak raises
    the floor for good. Sockets get more room, being mostly kept-alive
    connections (aiohttp pools up to 100 to the origin, and to siblings in a
    cluster; the database's pool), whose number ratchets up to the most
    requests that ever overlapped. A leak of one descriptor per failed fill
    would add ~60 by the end. Database descriptors follow threads, which the
    disk executor starts as load needs them: those are checked per thread
    (``check_database_descriptors``).
    """
    half = len(samples) // 2
    for kind, slack in (("other", OTHER_FD_SLACK), ("sockets", SOCKET_SLACK)):
        series = [getattr(sample, kind) for sample in samples]
        peak, floor = max(series[:half]), min(series[-5:])
        assert floor <= peak + slack, f"{kind}: {series}"


def check_database_descriptors(servers: list[ServeProcess]) -> None:
    """At most one sqlite connection per live thread: none outlives its thread."""
    for pid in service_pids(servers):
        threads = len(os.listdir(f"/proc/{pid}/task"))
        database = descriptors_of(pid).database
        assert database <= 2 * threads, f"{database} database descriptors for {threads} threads"


async def stop_cleanly(servers: list[ServeProcess]) -> None:
    for server in servers:
        assert await server.stop() == 0, server.log()[-3000:]
        log = server.log()
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:4000]
        # The parent replaces a dead worker (server/supervisor.py), so a death
        # no longer shows as a missing process: it shows in the log.
        died = [line for line in log.splitlines() if "starting a replacement" in line]
        assert not died, f"a worker died during the soak: {died[0]}"
