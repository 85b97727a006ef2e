"""A throwaway PostgreSQL on a WAN rig host: the central database at the far end of a link.

The machine's own PostgreSQL (127.0.0.1:5432) lives in the root namespace,
where the edge is: no link can be cut between them. This peer runs a
cluster of its own inside a rig namespace instead, with the project's relay
in front of it there too::

    edge (root namespace)                        namespace ic<pid>db
    psycopg --- veth (cut: blackhole qdisc) ---> relay 10.201.x.2:PORT (delay 20 ms each way)
                                                   `--> postgres 127.0.0.1:5432

So the database is 40 ms away, and ``host.cut()`` partitions it for real:
packets lost, no RST, no refusal. The cluster also listens on a unix socket
in its data directory; unix sockets are not namespaced, so ``local_url``
reaches the same database from the root namespace without the link: the
path of a node on the database's side of the cut.

The server is Debian's PostgreSQL 15 binaries, run as the ``postgres`` user
(it refuses root) over a data directory made by ``initdb`` for the test:
trust authentication, ``fsync`` off, small buffers. ``stop`` shuts it down
(``pg_ctl stop -m immediate``: nothing in it is kept) and removes the
directory. ``unavailable_reason`` says why it cannot run here (the
``far_postgres`` fixture then skips, loudly).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from peers.relay import RelayProcess
from peers.wan import Host, WanRig
from peers.wan import unavailable_reason as rig_unavailable

BIN = Path(os.environ.get("IMAGECACHE_TEST_PGBIN", "/usr/lib/postgresql/15/bin"))
USER = "postgres"
PORT = 5432  # inside the namespace: its own port space, nothing else there
DELAY = 0.02  # one way, at the relay: a 40 ms round trip


def unavailable_reason() -> str | None:
    """Why a namespaced PostgreSQL cannot run here, or None."""
    for tool in ("initdb", "postgres", "pg_ctl"):
        if not (BIN / tool).is_file():
            return f"no {BIN / tool} (set IMAGECACHE_TEST_PGBIN to PostgreSQL's bin directory)"
    if shutil.which("runuser") is None:
        return "no `runuser` on PATH (postgres refuses to run as root)"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER!r} user to run the server as"
    return rig_unavailable()


class FarPostgres:
    """A PostgreSQL cluster in ``host``'s namespace, behind a delay relay; ``stop`` ends both."""

    def __init__(
        self, host: Host, *, delay: float = DELAY, settings: dict[str, str] | None = None
    ) -> None:
        self.host = host
        self.settings = settings or {}  # more of the server's settings (``-c``), over ours
        self.directory = Path(tempfile.mkdtemp(prefix="imagecache-pgns-"))
        self.data = self.directory / "data"
        self.log_path = self.directory / "server.log"
        entry = pwd.getpwnam(USER)
        os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None
        self.relay: RelayProcess | None = None
        try:
            self._initdb()
            self._start()
            self.relay = RelayProcess(
                ("127.0.0.1", PORT), delay=delay, listen=host.address, netns=host.name
            )
        except BaseException:
            self.stop()
            raise

    def _as_postgres(self, *argv: str) -> list[str]:
        return ["runuser", "-u", USER, "--", *argv]

    def _initdb(self) -> None:
        done = subprocess.run(
            self._as_postgres(
                *(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", USER),
                *("-E", "UTF8", "--no-sync", "--no-instructions"),
            ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-600:]}")
        # Trust over the link too, for a client that comes without the relay.
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.host.gateway}/30 trust\n")

    def _start(self) -> None:
        settings = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "16MB",
            "max_connections": "60",
            "logging_collector": "off",
            **self.settings,
        }
        argv = [str(BIN / "postgres"), "-D", str(self.data), "-k", str(self.directory)]
        argv += ["-h", f"127.0.0.1,{self.host.address}", "-p", str(PORT)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = self.host.popen(self._as_postgres(*argv), stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:  # a bounded readiness poll: the server answers on its unix socket
            try:
                with self.connect("postgres"):
                    return
            except psycopg.OperationalError as exc:
                failure = exc
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not start ({failure}); log:\n{self.log()[-1500:]}"
                )
            time.sleep(0.1)  # the poll's interval, bounded by the deadline

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connect(self, dbname: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A connection over the unix socket (the root namespace's way in, not the link)."""
        return psycopg.connect(
            host=str(self.directory),
            port=PORT,
            user=USER,
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
            **kwargs,
        )

    def create_database(self) -> str:
        name = f"imagecache_far_{uuid.uuid4().hex[:10]}"
        with self.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name

    def url(self, dbname: str) -> str:
        """The database across the link: veth, then the relay (40 ms), then the server."""
        assert self.relay is not None
        return f"postgresql+psycopg://{USER}@{self.host.address}:{self.relay.port}/{dbname}"

    def direct_url(self, dbname: str) -> str:
        """The database across the link without the relay: the server sees the client's own
        connections (its ``tcp_keepalives_*`` then reach the client, not the relay)."""
        return f"postgresql+psycopg://{USER}@{self.host.address}:{PORT}/{dbname}"

    def local_url(self, dbname: str) -> str:
        """The database by its unix socket: no link, no relay (the database's own side)."""
        return f"postgresql+psycopg://{USER}@/{dbname}?host={self.directory}&port={PORT}"

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.process is not None:
            subprocess.run(
                self._as_postgres(
                    *(str(BIN / "pg_ctl"), "-D", str(self.data), "stop"),
                    *("-m", "immediate", "-w", "-t", "20"),
                ),
                capture_output=True,
                timeout=30,
                check=False,
            )
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()  # our own child (runuser), by its Popen
                self.process.wait()
            self.process = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self.directory)


@pytest.fixture
def far_postgres(wan_rig: WanRig) -> Iterator[FarPostgres]:
    """A PostgreSQL on its own rig host, 40 ms away behind the relay; skips loudly if it cannot."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"NAMESPACED POSTGRESQL UNAVAILABLE: {reason}")
    host = wan_rig.add_host("db")
    server = FarPostgres(host)
    try:
        yield server
    finally:
        server.stop()
