"""The service in front of a real Glance 33 API (the ``glance_peer`` fixtures).

Covers the passthrough proxy (versions document, listings, streamed uploads,
image deletion evicting the local copy), Glance's status codes through the
cache API, the origin's refusal of a caller on a cache hit, and the real
python-glanceclient working unchanged against the proxy.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.server.app import create_app
from imagecache.server.cache_api import WORKER
from imagecache.settings import Settings
from server_helpers import image_bytes, listdir, settled

pytestmark = pytest.mark.glance

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]
DATA = image_bytes(1024 * 1024 + 3, seed=11)
GLANCE_CLI = Path("/opt/peers/glance-venv/bin/glance")


def _require_clients() -> None:
    # Checked inside the test, after the glance_peer fixture has installed the
    # peer venv (which holds python-glanceclient and openstacksdk): a
    # collection-time skipif would skip on every fresh machine.
    if not GLANCE_CLI.exists():
        pytest.skip(
            f"CLIENTS UNAVAILABLE: python-glanceclient/openstacksdk not at {GLANCE_CLI} "
            "although the Glance peer is installed; rerun `glance-peer.sh install`"
        )


@pytest.fixture
async def proxy(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], glance_peer: Any
) -> TestClient[Any, Any]:
    settings = make_settings(upstream=f"glance:{glance_peer.url}", auth_cache_ttl=0)
    return await aiohttp_client(create_app(settings))


async def test_versions_list_the_cache_api(proxy: TestClient[Any, Any]) -> None:
    async with proxy.get("/versions") as response:
        assert response.status == 200
        versions = {v["id"]: v["status"] for v in (await response.json())["versions"]}
    assert versions["v2.18"] == "CURRENT"
    assert {f"v2.{minor}" for minor in range(14, 19)} <= set(versions)
    assert list(versions.values()).count("CURRENT") == 1


async def test_upload_download_delete_through_the_proxy(
    proxy: TestClient[Any, Any], cache_dir: Path
) -> None:
    meta = {"name": "via-proxy", "disk_format": "raw", "container_format": "bare"}
    async with proxy.post("/v2/images", json=meta) as response:
        assert response.status == 201
        image_id = (await response.json())["id"]

    async def body() -> AsyncIterator[bytes]:  # sent chunked: the proxy must stream it
        for start in range(0, len(DATA), 100_000):
            yield DATA[start : start + 100_000]

    headers = {"Content-Type": "application/octet-stream"}
    async with proxy.put(f"/v2/images/{image_id}/file", data=body(), headers=headers) as response:
        assert response.status == 204
    async with proxy.get("/v2/images") as response:
        assert image_id in {image["id"] for image in (await response.json())["images"]}
    for _ in range(2):  # miss, then hit
        async with proxy.get(f"/v2/images/{image_id}/file") as response:
            assert response.status == 200
            assert response.headers["Content-MD5"] == hashlib.md5(DATA).hexdigest()
            assert await response.read() == DATA
    assert (cache_dir / image_id).exists()
    async with proxy.delete(f"/v2/images/{image_id}") as response:
        assert response.status == 204
    assert not (cache_dir / image_id).exists(), "deleting the image evicts the local copy"
    async with proxy.get(f"/v2/images/{image_id}/file") as response:
        assert response.status == 404


async def test_cache_api_status_codes_from_glance(
    proxy: TestClient[Any, Any], glance_peer: Any, cache_dir: Path
) -> None:
    queued = await asyncio.to_thread(glance_peer.create_image, None)
    active = await asyncio.to_thread(glance_peer.create_image, DATA)
    async with proxy.put(f"/v2/cache/{queued}") as response:
        assert response.status == 400
    async with proxy.put("/v2/cache/00000000-0000-0000-0000-000000000000") as response:
        assert response.status == 404
    async with proxy.get(f"/v2/images/{queued}/file") as response:
        assert response.status == 204
    async with proxy.put(f"/v2/cache/{active}") as response:
        assert response.status == 202
    await proxy.app[WORKER].join()
    assert (cache_dir / active).read_bytes() == DATA
    assert listdir(cache_dir / "queue") == []


async def test_a_caller_the_origin_refuses_gets_no_hit(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    glance_peer_headers: Any,
    cache_dir: Path,
) -> None:
    peer = glance_peer_headers
    owner = peer.headers_for("project-a")
    stranger = peer.headers_for("project-b")
    image_id = await asyncio.to_thread(peer.create_image, DATA, visibility="private", headers=owner)
    settings = make_settings(upstream=f"glance:{peer.url}", auth_cache_ttl=0)
    proxy = await aiohttp_client(create_app(settings))
    async with proxy.get(f"/v2/images/{image_id}/file", headers=owner) as response:
        assert response.status == 200
        assert await response.read() == DATA
    await settled(proxy)
    assert (cache_dir / image_id).exists()
    # The image is cached now; the stranger must still get Glance's answer, not bytes.
    async with proxy.get(f"/v2/images/{image_id}/file", headers=stranger) as response:
        assert response.status in (403, 404)
        assert await response.read() != DATA
    async with proxy.get(f"/v2/images/{image_id}/file", headers={}) as response:
        assert response.status in (401, 403, 404)


async def test_glanceclient_works_unchanged_against_the_proxy(
    proxy: TestClient[Any, Any], glance_peer: Any, tmp_path: Path, cache_dir: Path
) -> None:
    _require_clients()
    image_id = await asyncio.to_thread(glance_peer.create_image, DATA)
    url = str(proxy.make_url("")).rstrip("/")

    async def glance(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            str(GLANCE_CLI),
            "--os-image-url",
            url,
            "--os-auth-token",
            "fake",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        out, err = await process.communicate()
        assert process.returncode == 0, f"glance {' '.join(args)}: {err.decode()[-2000:]}"
        return out.decode()

    assert image_id in await glance("image-list")
    assert image_id in await glance("image-show", image_id)
    target = tmp_path / "downloaded"
    await glance("image-download", image_id, "--file", str(target))  # the client verifies
    assert target.read_bytes() == DATA
    assert image_id in await glance("cache-list")
    await glance("cache-delete", image_id)
    assert not (cache_dir / image_id).exists()
    await glance("cache-queue", image_id)
    await proxy.app[WORKER].join()
    assert (cache_dir / image_id).exists()
    await glance("cache-clear")
    assert not (cache_dir / image_id).exists()


_SDK_DOWNLOAD = """
import hashlib, sys
import openstack
conn = openstack.connect(
    auth_type="none", image_endpoint_override=sys.argv[1], region_name="RegionOne"
)
image = conn.image.get_image(sys.argv[2])
data = b"".join(conn.image.download_image(image, stream=True).iter_content(1 << 20))
print(hashlib.sha256(data).hexdigest())
"""


async def test_openstacksdk_downloads_through_the_proxy(
    proxy: TestClient[Any, Any], glance_peer: Any, cache_dir: Path
) -> None:
    _require_clients()
    image_id = await asyncio.to_thread(glance_peer.create_image, DATA)
    url = str(proxy.make_url("")).rstrip("/")
    process = await asyncio.create_subprocess_exec(
        str(GLANCE_CLI.parent / "python"),
        "-c",
        _SDK_DOWNLOAD,
        url,
        image_id,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip() == hashlib.sha256(DATA).hexdigest()
    assert (cache_dir / image_id).read_bytes() == DATA


# Run by the real python-glanceclient of the peer's venv: what `glance
# image-download` sees, for a caller given by its identity headers.
_GLANCECLIENT_DOWNLOAD = """
import hashlib, json, sys
from glanceclient import Client, exc
client = Client("2", endpoint=sys.argv[1], identity_headers=json.loads(sys.argv[3]))
try:
    body = client.images.data(sys.argv[2])
except exc.HTTPException as error:
    print(error.code)
else:
    wrapped = getattr(body, "wrapped", body)
    if wrapped is None or (isinstance(wrapped, tuple) and wrapped[0] is None):
        print("204 no data")
    else:
        print("200", hashlib.sha256(b"".join(body)).hexdigest())
"""


async def _glanceclient_download(url: str, image_id: str, headers: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        str(GLANCE_CLI.with_name("python")),
        "-c",
        _GLANCECLIENT_DOWNLOAD,
        url,
        image_id,
        json.dumps(headers),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode().strip()


async def test_a_deactivated_image_answers_what_glance_answers_cold_or_warm(
    aiohttp_client: ClientFactory,
    make_settings: Callable[..., Settings],
    glance_peer_headers: Any,
    cache_dir: Path,
) -> None:
    """Glance gives a deactivated image's data to an admin (200) and refuses
    everyone else (403); the proxy must too, whether the image is cached or not."""
    _require_clients()
    peer = glance_peer_headers
    # One role each: glanceclient percent-encodes header values, so Glance
    # would read "admin,member" as one role named "admin%2Cmember".
    admin = {**peer.admin_headers, "X-Roles": "admin"}
    member = peer.headers_for("project-a", roles="reader")
    image_id = await asyncio.to_thread(peer.create_image, DATA, visibility="public")
    status, body = await asyncio.to_thread(
        peer.request, "POST", f"/v2/images/{image_id}/actions/deactivate"
    )
    assert status == 204, body
    whole = f"200 {hashlib.sha256(DATA).hexdigest()}"
    assert await _glanceclient_download(peer.url, image_id, admin) == whole
    assert await _glanceclient_download(peer.url, image_id, member) == "403"

    settings = make_settings(upstream=f"glance:{peer.url}", auth_cache_ttl=0)
    proxy = await aiohttp_client(create_app(settings))
    url = str(proxy.make_url("")).rstrip("/")
    # Cold: nothing cached yet.
    assert await _glanceclient_download(url, image_id, member) == "403"
    assert not (cache_dir / image_id).exists()
    assert await _glanceclient_download(url, image_id, admin) == whole
    await settled(proxy)
    # Warm: the admin's download cached it; the answers stay Glance's.
    assert (cache_dir / image_id).exists()
    assert await _glanceclient_download(url, image_id, member) == "403"
    assert await _glanceclient_download(url, image_id, admin) == whole
