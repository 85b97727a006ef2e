"""``glance_peer`` / ``glance_peer_headers``: a real Glance 33 API on a free loopback port.

Both are session-scoped and use ``../shared/peers/glance-peer.sh`` (the
``shared/`` directory beside this checkout): ``install`` once into its default
venv (``/opt/peers/glance-venv``; a no-op when already there), then ``start``
an instance with its own data directory under pytest's temp dir and a free
port, and ``stop`` it at the end of the session. Cold install takes about
20 s, start about 2.5 s. When the script is missing or the install fails (no
network to PyPI), every test using the fixture is skipped with the reason.

- ``glance_peer``: ``noauth`` mode, every caller is admin; glanceclient and
  openstacksdk work against it.
- ``glance_peer_headers``: ``GLANCE_PEER_AUTH=headers``, identity from trusted
  headers with the stock RBAC policy; started only when a test asks for it.
  ``peer.headers_for("project-a")`` gives a member's headers.

API (``peer = glance_peer``)::

    peer.url                                     # "http://127.0.0.1:PORT"
    peer.admin_headers                           # identity headers of an admin
    peer.create_image(data, visibility="public", headers=None) -> image id
    peer.create_image(None)                      # an image left 'queued' (no data)
    peer.seed(3, 1 << 20) -> [(image_id, data)]  # random images
    peer.request("GET", "/v2/images/ID", headers=None) -> (status, body bytes)
    peer.stop(); peer.start()                    # cut the origin, bring it back
    peer.logged_requests("GET /v2/images/ID/file")  # lines of its access log

``_start(tmp_path_factory, "headers", netns=host.name)`` starts one inside a
WAN rig namespace (tests/peers/wan.py), reached through a relay started there
(tests/wan/test_wan_offline.py).

The helpers are synchronous (``http.client``): Glance runs in another
process, so a short blocking call from a test does not stall anything that
Glance needs.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peers import free_port

SCRIPT = Path(__file__).resolve().parents[2].parent / "shared" / "peers" / "glance-peer.sh"
ADMIN_HEADERS = {
    "X-Auth-Token": "fake",
    "X-Identity-Status": "Confirmed",
    "X-Roles": "admin,member,reader",
    "X-User-Id": "peer-admin",
    "X-Project-Id": "peer-project",
}


@dataclass
class GlancePeer:
    """A running Glance instance started by the fixture."""

    url: str
    env: dict[str, str]
    admin_headers: dict[str, str] = field(default_factory=lambda: dict(ADMIN_HEADERS))
    netns: str | None = None  # the network namespace it runs in (None: the root one)

    @property
    def access_log(self) -> Path:
        """gunicorn's access log: one line per request Glance answered."""
        return Path(self.env["GLANCE_PEER_DATA"]) / "log" / "access.log"

    def logged_requests(self, needle: str) -> int:
        """How many access log lines contain ``needle`` (e.g. ``"GET /v2/images/ID/file"``)."""
        if not self.access_log.exists():
            return 0
        return sum(needle in line for line in self.access_log.read_text().splitlines())

    @staticmethod
    def headers_for(project: str, roles: str = "member,reader") -> dict[str, str]:
        """Trusted identity headers of a user in ``project`` (headers mode)."""
        return {
            "X-Auth-Token": f"token-{project}",
            "X-Identity-Status": "Confirmed",
            "X-Roles": roles,
            "X-User-Id": f"user-{project}",
            "X-Project-Id": project,
        }

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(method, path, body=body, headers=dict(headers or self.admin_headers))
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def create_image(
        self,
        data: bytes | None,
        *,
        visibility: str = "public",
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Create an image and upload ``data`` (None: leave it queued, without data)."""
        who = {**(headers or self.admin_headers), "Content-Type": "application/json"}
        meta = {
            "name": f"test-{secrets.token_hex(4)}",
            "disk_format": "raw",
            "container_format": "bare",
            "visibility": visibility,
        }
        status, body = self.request("POST", "/v2/images", json.dumps(meta).encode(), who)
        assert status == 201, f"Glance image create: HTTP {status} {body[:200]!r}"
        image_id = str(json.loads(body)["id"])
        if data is not None:
            upload = {**who, "Content-Type": "application/octet-stream"}
            status, body = self.request("PUT", f"/v2/images/{image_id}/file", data, upload)
            assert status == 204, f"Glance upload: HTTP {status} {body[:200]!r}"
        return image_id

    def seed(self, count: int, size: int) -> list[tuple[str, bytes]]:
        images = []
        for _ in range(count):
            data = secrets.token_bytes(size)
            images.append((self.create_image(data), data))
        return images

    def stop(self) -> None:
        _run("stop", self.env, timeout=60, netns=self.netns)

    def start(self) -> None:
        """Start it again after ``stop`` (same data, port and namespace)."""
        started = _run("start", self.env, timeout=300, netns=self.netns)
        assert started.returncode == 0, started.stderr[-1500:]


def _run(
    command: str, env: dict[str, str], timeout: float, netns: str | None = None
) -> subprocess.CompletedProcess[str]:
    prefix = [] if netns is None else ["ip", "netns", "exec", netns]
    return subprocess.run(
        [*prefix, str(SCRIPT), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _start(
    tmp_path_factory: pytest.TempPathFactory, auth: str, *, netns: str | None = None
) -> GlancePeer:
    """Install (once) and start a Glance; ``netns``: inside that network namespace.

    In a namespace it listens on the namespace's own loopback (the script
    binds loopback only) on 9292, which no other process there can hold;
    the caller reaches it through a relay started in the same namespace.
    """
    if not SCRIPT.is_file():
        pytest.skip(f"GLANCE PEER UNAVAILABLE: {SCRIPT} not found (shared/ beside the checkout)")
    env = dict(os.environ)
    installed = _run("install", env, timeout=600)
    if installed.returncode != 0:
        pytest.skip(
            "GLANCE PEER UNAVAILABLE: `glance-peer.sh install` failed (no PyPI?): "
            + installed.stderr[-800:]
        )
    port = 9292 if netns is not None else free_port()
    env.update(
        GLANCE_PEER_HOST="127.0.0.1",
        GLANCE_PEER_DATA=str(tmp_path_factory.mktemp(f"glance-{auth}")),
        GLANCE_PEER_PORT=str(port),
        GLANCE_PEER_AUTH=auth,
    )
    started = _run("start", env, timeout=300, netns=netns)
    if started.returncode != 0:
        # The script leaves nothing running on failure except in the rare
        # "not healthy after 120s" case; stop() covers that.
        _run("stop", env, timeout=60, netns=netns)
        pytest.fail(f"Glance peer installed but failed to start: {started.stderr[-1500:]}")
    return GlancePeer(url=f"http://127.0.0.1:{port}", env=env, netns=netns)


@pytest.fixture(scope="session")
def glance_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlancePeer]:
    """A real Glance API in noauth mode (every caller is admin)."""
    peer = _start(tmp_path_factory, "noauth")
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def glance_peer_headers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GlancePeer]:
    """A real Glance API that takes identity from trusted headers (stock RBAC policy)."""
    peer = _start(tmp_path_factory, "headers")
    try:
        yield peer
    finally:
        peer.stop()
