"""imagecache in a real OpenStack cloud: Keystone tokens, Glance validating them, the catalog.

One small cloud for the module: the session's Keystone (tests/peers/keystone.py)
with its demo projects, a Glance that validates tokens with keystonemiddleware
(its own token cache off, so a revocation counts at once), and ``imagecache
serve`` in front of it with a ``[keystone]`` table for its own account. The
clients are the real packages from the peers' venvs: ``openstack``
(python-openstackclient) and ``glance`` (python-glanceclient).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers import free_port, run_script
from peers.glance import SCRIPT as GLANCE_SCRIPT
from peers.keystone import SCRIPT as KEYSTONE_SCRIPT
from peers.keystone import KeystonePeer
from polling import eventually_sync

OPENSTACK = Path("/opt/peers/keystone-venv/bin/openstack")
GLANCE_CLI = Path("/opt/peers/glance-venv/bin/glance")


@dataclass
class Cloud:
    ks: KeystonePeer
    glance_port: int
    glance_env: dict[str, str]
    cache_url: str
    cache_dir: Path
    log_path: Path
    public: str
    private: str  # alpha's private image
    private_sha256: str

    def get(
        self, path: str, token: str | None = None, method: str = "GET", **headers: str
    ) -> tuple[int, bytes, Mapping[str, str]]:
        host, port = self.cache_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        if token is not None:
            headers["X-Auth-Token"] = token
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        connection.close()
        return response.status, body, dict(response.getheaders())

    def cli_env(self, user: str, region: str = "Edge1") -> dict[str, str]:
        name = user.upper()
        values = self.ks.values
        return {
            **os.environ,
            "OS_AUTH_URL": self.ks.auth_url,
            "OS_IDENTITY_API_VERSION": "3",
            "OS_USERNAME": user,
            "OS_PASSWORD": values[f"KEYSTONE_PEER_USER_{name}_PASSWORD"],
            "OS_PROJECT_NAME": values[f"KEYSTONE_PEER_USER_{name}_PROJECT"],
            "OS_USER_DOMAIN_ID": "default",
            "OS_PROJECT_DOMAIN_ID": "default",
            "OS_REGION_NAME": region,
            "OS_INTERFACE": "public",
        }

    def cached(self) -> list[str]:
        return sorted(p.name for p in self.cache_dir.iterdir() if p.is_file() and "." not in p.name)


def _cli(tool: Path, args: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    if not tool.exists():
        pytest.skip(f"SKIPPED LOUDLY: {tool} missing (the peers' install did not provide it)")
    return subprocess.run(
        [str(tool), *args], env=dict(env), capture_output=True, text=True, timeout=120, check=False
    )


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    host, port = url.removeprefix("http://").split(":")

    def healthy() -> bool:
        assert process.poll() is None, "imagecache exited:\n" + log_path.read_text()
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            connection.request("GET", "/healthcheck")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()  # left to the garbage collector, a ResourceWarning

    eventually_sync(
        healthy, "imagecache is healthy", within=60, interval=0.1, detail=log_path.read_text
    )


def _password_env(ks: KeystonePeer) -> dict[str, str]:
    return {
        "IMAGECACHE_KEYSTONE__AUTH_URL": ks.auth_url,
        "IMAGECACHE_KEYSTONE__USERNAME": "imagecache",
        "IMAGECACHE_KEYSTONE__PASSWORD": ks.values["KEYSTONE_PEER_USER_IMAGECACHE_PASSWORD"],
        "IMAGECACHE_KEYSTONE__PROJECT_NAME": "service",
        "IMAGECACHE_KEYSTONE__USER_DOMAIN_ID": "default",
        "IMAGECACHE_KEYSTONE__PROJECT_DOMAIN_ID": "default",
    }


def _serve(
    ks: KeystonePeer,
    glance_port: int,
    port: int,
    cache_dir: Path,
    log_path: Path,
    identity: Mapping[str, str],
) -> subprocess.Popen[bytes]:
    """``imagecache serve`` in front of the cloud's Glance, as the given Keystone account."""
    if identity:
        identity = {**identity, "IMAGECACHE_KEYSTONE__TOKEN_CACHE_TTL": "2"}
    env = {
        **os.environ,
        "IMAGECACHE_LOG_LEVEL": "INFO",
        **identity,
        "IMAGECACHE_QUEUE_INTERVAL": "0.5",
        "IMAGECACHE_AUTH_CACHE_TTL": "0",
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from imagecache.cli import main; main()",
                "serve",
                "--port",
                str(port),
                "--cache-dir",
                str(cache_dir),
                "--upstream",
                f"glance:http://127.0.0.1:{glance_port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    _wait_healthy(f"http://127.0.0.1:{port}", process, log_path)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


def _queue_on_disk(cache_dir: Path, image_id: str) -> None:
    """Queue with no caller token at all: the CLI writes the marker in the cache directory."""
    queued = subprocess.run(
        [
            sys.executable,
            "-c",
            "from imagecache.cli import main; main()",
            "--cache-dir",
            str(cache_dir),
            "queue-image",
            image_id,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert queued.returncode == 0, queued.stderr


def _wait_cached(cache_dir: Path, image_id: str, log_path: Path) -> None:
    eventually_sync(
        (cache_dir / image_id).is_file,
        f"{image_id} is fetched",
        within=60,
        interval=0.2,
        detail=lambda: log_path.read_text()[-3000:],
    )


@pytest.fixture(scope="module")
def cloud(keystone_peer: KeystonePeer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    ks = keystone_peer
    glance_port, cache_port = free_port(), free_port()
    cache_url = f"http://127.0.0.1:{cache_port}"
    # The catalog: RegionOne's image endpoint is Glance, Edge1's is the cache.
    demo = run_script(
        KEYSTONE_SCRIPT,
        "setup-demo",
        {
            **ks.env,
            "KEYSTONE_PEER_IMAGE_URL": f"http://127.0.0.1:{glance_port}",
            "KEYSTONE_PEER_EDGE_IMAGE_URL": cache_url,
        },
        timeout=300,
    )
    assert demo.returncode == 0, demo.stderr[-1500:]
    glance_env = {
        **os.environ,
        "GLANCE_PEER_HOST": "127.0.0.1",
        "GLANCE_PEER_PORT": str(glance_port),
        "GLANCE_PEER_DATA": str(tmp_path_factory.mktemp("glance-keystone")),
        "GLANCE_PEER_AUTH": "keystone",
        "GLANCE_PEER_KEYSTONE_URL": f"http://127.0.0.1:{ks.port}",
        "GLANCE_PEER_KEYSTONE_TOKEN_CACHE": "-1",
    }
    if run_script(GLANCE_SCRIPT, "install", glance_env, timeout=900).returncode != 0:
        pytest.skip("GLANCE PEER UNAVAILABLE: glance-peer.sh install failed")
    started = run_script(GLANCE_SCRIPT, "start", glance_env, timeout=300)
    assert started.returncode == 0, started.stderr[-1500:]
    process = None
    try:
        public = run_script(GLANCE_SCRIPT, "seed", glance_env, timeout=120, args=("1", "1"))
        private = run_script(
            GLANCE_SCRIPT,
            "seed",
            {
                **glance_env,
                "GLANCE_PEER_SEED_PROJECT": "alpha",
                "GLANCE_PEER_SEED_VISIBILITY": "private",
            },
            timeout=120,
            args=("1", "1"),
        )
        assert public.returncode == 0, public.stderr
        assert private.returncode == 0, private.stderr
        public_id = public.stdout.split()[-1]
        private_id = private.stdout.split()[-1]
        sha = private.stderr.rsplit("sha256=", 1)[1].split()[0]

        cache_dir = tmp_path_factory.mktemp("edge-cache")
        log_path = cache_dir.parent / "edge-cache-serve.log"
        process = _serve(ks, glance_port, cache_port, cache_dir, log_path, _password_env(ks))
        yield Cloud(
            ks,
            glance_port,
            glance_env,
            cache_url,
            cache_dir,
            log_path,
            public_id,
            private_id,
            sha,
        )
    finally:
        if process is not None:
            _stop(process)
        run_script(GLANCE_SCRIPT, "stop", glance_env, timeout=60)


def test_a_member_downloads_its_private_image_through_the_cache(cloud: Cloud) -> None:
    alice = cloud.ks.token("alice")
    for round_ in ("miss", "hit"):
        status, body, _ = cloud.get(f"/v2/images/{cloud.private}/file", alice)
        assert status == 200, round_
        assert hashlib.sha256(body).hexdigest() == cloud.private_sha256, round_
    assert cloud.private in cloud.cached()


@pytest.mark.parametrize("who", ["bob", "no token", "garbage"])
def test_other_callers_get_no_byte_of_it_cold_or_warm(cloud: Cloud, who: str) -> None:
    token = {"bob": cloud.ks.token("bob"), "no token": None, "garbage": "garbage-token"}[who]
    alice = cloud.ks.token("alice")
    status, _, _ = cloud.get(f"/v2/images/{cloud.private}/file", alice)
    assert status == 200  # warm
    status, body, _ = cloud.get(f"/v2/images/{cloud.private}/file", token)
    assert status in (401, 403, 404), status
    assert len(body) < 4096  # an error document, never image bytes
    assert hashlib.sha256(body).hexdigest() != cloud.private_sha256


def test_the_operator_manages_the_cache_with_real_clients_and_alice_cannot(cloud: Cloud) -> None:
    operator, alice = cloud.cli_env("operator"), cloud.cli_env("alice")
    listed = _cli(OPENSTACK, ["cached", "image", "list", "-f", "json"], operator)
    assert listed.returncode == 0, listed.stderr
    json.loads(listed.stdout)
    refused = _cli(OPENSTACK, ["cached", "image", "list"], alice)
    assert refused.returncode != 0
    assert "Forbidden" in refused.stderr

    glance_args = ["--os-region-name", "Edge1"]
    for args in (
        ["cache-list"],
        ["cache-queue", cloud.public],
        ["cache-delete", cloud.public],
        ["cache-clear"],
    ):
        ok = _cli(GLANCE_CLI, [*glance_args, *args], operator)
        assert ok.returncode == 0, (args, ok.stderr)
        no = _cli(GLANCE_CLI, [*glance_args, *args], alice)
        # glanceclient exits 0 after a refused cache-queue, cache-delete or
        # cache-clear, saying "not permitted"; cache-list fails with our refusal.
        if args[0] == "cache-list":
            assert no.returncode != 0, args
            assert "admin" in no.stderr, (args, no.stderr)
        else:
            assert "not permitted" in no.stderr, (args, no.stderr)


def test_a_revoked_operator_token_stops_working_within_the_validation_ttl(cloud: Cloud) -> None:
    token = cloud.ks.token("operator")
    assert cloud.get("/v2/cache", token)[0] == 200
    cloud.ks.revoke(token)
    # token_cache_ttl is 2 s for this service
    eventually_sync(
        lambda: cloud.get("/v2/cache", token)[0] != 200,
        "a revoked token no longer manages the cache",
        within=30,
        interval=0.2,
    )
    assert cloud.get("/v2/cache", token)[0] == 403


def test_a_queued_private_image_is_fetched_under_the_cache_s_own_identity(
    cloud: Cloud,
) -> None:
    # Queued with no caller token at all (the CLI writes the marker on disk): the
    # periodic re-drive fetches it as the cache's own Keystone account. Anonymous
    # callers get 404 for alpha's private image, so nothing else could fetch it.
    operator = cloud.ks.token("operator")
    assert cloud.get(f"/v2/cache/{cloud.private}", operator, method="DELETE")[0] == 204
    assert cloud.private not in cloud.cached()
    _queue_on_disk(cloud.cache_dir, cloud.private)
    _wait_cached(cloud.cache_dir, cloud.private, cloud.log_path)
    data = (cloud.cache_dir / cloud.private).read_bytes()
    assert hashlib.sha256(data).hexdigest() == cloud.private_sha256


def test_the_edge_region_s_catalog_entry_leads_clients_through_the_cache(
    cloud: Cloud, tmp_path: Path
) -> None:
    out = tmp_path / "saved.img"
    saved = _cli(
        OPENSTACK, ["image", "save", "--file", str(out), cloud.private], cloud.cli_env("alice")
    )
    assert saved.returncode == 0, saved.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == cloud.private_sha256
    served = cloud.log_path.read_text()
    assert f"/v2/images/{cloud.private}/file" in served  # it went through the cache
    downloaded = tmp_path / "glance.img"
    glance = _cli(
        GLANCE_CLI,
        ["--os-region-name", "Edge1", "image-download", "--file", str(downloaded), cloud.private],
        cloud.cli_env("alice"),
    )
    assert glance.returncode == 0, glance.stderr
    assert downloaded.read_bytes() == out.read_bytes()
    versions = cloud.get("/versions")[1].decode()
    assert cloud.cache_url in versions or "127.0.0.1" in versions


def test_the_same_with_an_application_credential(cloud: Cloud, tmp_path: Path) -> None:
    values = cloud.ks.values
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    log_path = tmp_path / "serve.log"
    process = _serve(
        cloud.ks,
        cloud.glance_port,
        free_port(),
        cache_dir,
        log_path,
        {
            "IMAGECACHE_KEYSTONE__AUTH_URL": cloud.ks.auth_url,
            "IMAGECACHE_KEYSTONE__APPLICATION_CREDENTIAL_ID": values[
                "KEYSTONE_PEER_APPCRED_IMAGECACHE_ID"
            ],
            "IMAGECACHE_KEYSTONE__APPLICATION_CREDENTIAL_SECRET": values[
                "KEYSTONE_PEER_APPCRED_IMAGECACHE_SECRET"
            ],
        },
    )
    try:
        _queue_on_disk(cache_dir, cloud.private)
        _wait_cached(cache_dir, cloud.private, log_path)
        data = (cache_dir / cloud.private).read_bytes()
        assert hashlib.sha256(data).hexdigest() == cloud.private_sha256
        assert values["KEYSTONE_PEER_APPCRED_IMAGECACHE_SECRET"] not in log_path.read_text()
    finally:
        _stop(process)


def test_a_cache_without_an_account_says_why_it_cannot_prefetch_a_private_image(
    cloud: Cloud, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    log_path = tmp_path / "serve.log"
    process = _serve(cloud.ks, cloud.glance_port, free_port(), cache_dir, log_path, {})
    try:
        _queue_on_disk(cache_dir, cloud.private)
        eventually_sync(
            lambda: "needs a role that may download this image" in log_path.read_text(),
            "the re-drive logs the missing role",
            within=60,
            interval=0.2,
            detail=lambda: log_path.read_text()[-3000:],
        )
        assert not (cache_dir / cloud.private).exists()
    finally:
        _stop(process)


def test_keystone_away_refuses_management_with_503_and_recovers_without_a_restart(
    cloud: Cloud,
) -> None:
    # Last in the module: it stops the session's Keystone and starts it again.
    fresh = cloud.ks.token("operator")
    alice = cloud.ks.token("alice")
    cloud.ks.stop()
    try:
        status, body, _ = cloud.get("/v2/cache", fresh)
        assert status == 503
        assert b"Keystone" in body
        assert cloud.get("/healthcheck")[0] == 200  # the service itself is fine
        # Downloads are the origin's call, Keystone or not: whatever Glance answers
        # now, the cache never hands out the image without its yes.
        status, body, _ = cloud.get(f"/v2/images/{cloud.private}/file", alice)
        if status == 200:
            assert hashlib.sha256(body).hexdigest() == cloud.private_sha256
        else:
            assert len(body) < 4096
    finally:
        cloud.ks.start()
    eventually_sync(
        lambda: cloud.get("/v2/cache", fresh)[0] == 200,
        "management recovers after Keystone came back",
        within=30,
        interval=0.2,
    )
    assert "Traceback" not in cloud.log_path.read_text()
