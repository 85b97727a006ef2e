"""``keystone_peer``: a real Keystone 30 on a free loopback port, with the demo cloud.

Session-scoped; uses ``../shared/peers/keystone-peer.sh``: ``install`` once
into its default venv (``/opt/peers/keystone-venv``, about 30 s cold, a no-op
after), ``start`` an instance with its own data directory and port, then
``setup-demo`` (projects service/alpha/beta, users imagecache/alice/bob/
operator, an application credential for imagecache). Tests get real tokens
from it. When the script is missing or the install fails, every test using
the fixture is skipped with the reason.

API (``ks = keystone_peer``)::

    ks.auth_url                      # "http://127.0.0.1:PORT/v3"
    ks.values["KEYSTONE_PEER_USER_ALICE_ID"]   # any NAME=value line of setup-demo
    ks.token("alice")                # a project-scoped token of a demo user
    ks.revoke(token)                 # DELETE /v3/auth/tokens (as the admin)
    ks.stop() / ks.start()           # for outage tests; the same port and data

``keystone_short`` is a second instance whose tokens live 60 s (expiry and
renewal tests; outage tests stop and start it, never the shared one).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peers import free_port, install_or_skip, run_script

SCRIPT = Path(__file__).resolve().parents[2].parent / "shared" / "peers" / "keystone-peer.sh"


@dataclass
class KeystonePeer:
    port: int
    env: dict[str, str]
    values: dict[str, str] = field(default_factory=dict)

    @property
    def auth_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v3"

    def _request(
        self, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
    ) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        payload = None if body is None else json.dumps(body).encode()
        connection.request(
            method,
            "/v3" + path,
            body=payload,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        response = connection.getresponse()
        response.read()
        connection.close()
        return response

    def token(self, user: str) -> str:
        """A token of demo user ``user`` (alice, bob, operator, imagecache, admin)."""
        name = user.upper()
        project = self.values[f"KEYSTONE_PEER_USER_{name}_PROJECT"]
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "id": self.values[f"KEYSTONE_PEER_USER_{name}_ID"],
                            "password": self.values[f"KEYSTONE_PEER_USER_{name}_PASSWORD"],
                        }
                    },
                },
                "scope": {
                    "project": {"id": self.values[f"KEYSTONE_PEER_PROJECT_{project.upper()}_ID"]}
                },
            }
        }
        response = self._request("POST", "/auth/tokens", body)
        assert response.status == 201, f"token for {user}: HTTP {response.status}"
        return str(response.getheader("X-Subject-Token"))

    def revoke(self, token: str) -> None:
        admin = self.token("admin")
        response = self._request(
            "DELETE", "/auth/tokens", headers={"X-Auth-Token": admin, "X-Subject-Token": token}
        )
        assert response.status == 204, f"revoke: HTTP {response.status}"

    def stop(self) -> None:
        _run("stop", self.env, timeout=60)

    def running(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/v3")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()  # also after an error: else a ResourceWarning

    def start(self) -> None:
        started = _run("start", self.env, timeout=300)
        assert started.returncode == 0, started.stderr[-1500:]


def _run(command: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return run_script(SCRIPT, command, env, timeout)


def start_keystone(tmp_path_factory: pytest.TempPathFactory, **settings: str) -> KeystonePeer:
    """A Keystone of its own; ``settings`` are extra ``KEYSTONE_PEER_*`` variables."""
    env = dict(os.environ)
    install_or_skip(SCRIPT, "KEYSTONE PEER", env)
    port = free_port()
    env.update(
        KEYSTONE_PEER_HOST="127.0.0.1",
        KEYSTONE_PEER_PORT=str(port),
        KEYSTONE_PEER_DATA=str(tmp_path_factory.mktemp("keystone")),
        **settings,
    )
    peer = KeystonePeer(port, env)
    started = _run("start", env, timeout=300)
    if started.returncode != 0:
        _run("stop", env, timeout=60)
        pytest.fail(f"Keystone peer installed but failed to start: {started.stderr[-1500:]}")
    demo = _run("setup-demo", env, timeout=300)
    if demo.returncode != 0:
        _run("stop", env, timeout=60)
        pytest.fail(f"Keystone setup-demo failed: {demo.stderr[-1500:]}")
    peer.values = dict(
        line.split("=", 1) for line in demo.stdout.split() if line.startswith("KEYSTONE_PEER_")
    )
    return peer


@pytest.fixture(scope="session")
def keystone_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeystonePeer]:
    """A real Keystone with the demo cloud (tokens live an hour)."""
    peer = start_keystone(tmp_path_factory)
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def keystone_short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeystonePeer]:
    """A second Keystone whose tokens live 60 s; tests may stop and start it."""
    peer = start_keystone(tmp_path_factory, KEYSTONE_PEER_TOKEN_EXPIRATION="60")
    try:
        yield peer
    finally:
        peer.stop()
