"""The glance upstream against a real Glance 33 API: status, identity and the proxy helper.

The shared behaviour (info, ranges, resets) is in ``test_upstream_contract.py``.
Authorization runs against ``glance_peer_headers``, a Glance that takes the
caller's identity from trusted headers and applies its stock RBAC policy.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from imagecache.errors import UpstreamError, UpstreamForbidden, UpstreamNotActive, UpstreamNotFound
from imagecache.settings import Settings
from imagecache.upstreams import Caller, create_upstream
from imagecache.upstreams.glance import GlanceUpstream
from peers.glance import GlancePeer

REFUSED = (UpstreamForbidden, UpstreamNotFound)


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


@pytest.fixture
async def glance(
    glance_peer: GlancePeer, make_settings: Callable[..., Settings]
) -> AsyncIterator[GlanceUpstream]:
    upstream = create_upstream("glance:" + glance_peer.url, make_settings())
    assert isinstance(upstream, GlanceUpstream)
    yield upstream
    await upstream.close()


@pytest.fixture
async def glance_rbac(
    glance_peer_headers: GlancePeer, make_settings: Callable[..., Settings]
) -> AsyncIterator[GlanceUpstream]:
    upstream = create_upstream("glance:" + glance_peer_headers.url, make_settings())
    assert isinstance(upstream, GlanceUpstream)
    yield upstream
    await upstream.close()


async def test_image_without_data_is_not_active(
    glance: GlanceUpstream, glance_peer: GlancePeer
) -> None:
    image_id = glance_peer.create_image(None)
    with pytest.raises(UpstreamNotActive, match="queued"):
        await glance.info(image_id)
    with pytest.raises(UpstreamNotActive):
        await collect(glance.stream(image_id))


async def test_info_carries_glance_multihash(
    glance: GlanceUpstream, glance_peer: GlancePeer
) -> None:
    data = secrets.token_bytes(10_000)
    info = await glance.info(glance_peer.create_image(data))
    assert info.hash_algo == "sha512"
    assert info.hash_value == hashlib.sha512(data).hexdigest()
    assert info.checksum == hashlib.md5(data).hexdigest()


async def test_other_project_is_refused_a_private_image(
    glance_rbac: GlanceUpstream, glance_peer_headers: GlancePeer
) -> None:
    owner = Caller(GlancePeer.headers_for("project-a"))
    stranger = Caller(GlancePeer.headers_for("project-b"))
    data = secrets.token_bytes(5000)
    image_id = glance_peer_headers.create_image(
        data, visibility="private", headers=GlancePeer.headers_for("project-a")
    )
    # The owner may do everything...
    assert (await glance_rbac.info(image_id, owner)).size == len(data)
    await glance_rbac.check_access(image_id, owner)
    assert await collect(glance_rbac.stream(image_id, owner)) == data
    # ...another project nothing.
    with pytest.raises(REFUSED):
        await glance_rbac.info(image_id, stranger)
    with pytest.raises(REFUSED):
        await glance_rbac.check_access(image_id, stranger)
    with pytest.raises(REFUSED):
        await collect(glance_rbac.stream(image_id, stranger))


async def test_caller_without_identity_is_forbidden(
    glance_rbac: GlanceUpstream, glance_peer_headers: GlancePeer
) -> None:
    image_id = glance_peer_headers.create_image(b"x" * 100, visibility="public")
    with pytest.raises(UpstreamForbidden) as refused:
        await glance_rbac.check_access(image_id, Caller())
    assert refused.value.status == 401


async def test_check_access_asks_the_download_question(
    glance_rbac: GlanceUpstream, glance_peer_headers: GlancePeer
) -> None:
    """A deactivated image can still be *seen* by its owner, but not downloaded.

    This is why ``check_access`` probes the file route rather than the metadata.
    """
    member = GlancePeer.headers_for("project-c")
    image_id = glance_peer_headers.create_image(b"y" * 100, visibility="private", headers=member)
    status, body = glance_peer_headers.request("POST", f"/v2/images/{image_id}/actions/deactivate")
    assert status == 204, body
    caller = Caller(member)
    status, body = glance_peer_headers.request("GET", f"/v2/images/{image_id}", headers=member)
    assert status == 200, "the owner can still read the metadata"
    assert json.loads(body)["status"] == "deactivated"
    with pytest.raises(UpstreamForbidden):
        await glance_rbac.check_access(image_id, caller)
    # An admin may still download a deactivated image, as in Glance.
    await glance_rbac.check_access(image_id, Caller(glance_peer_headers.admin_headers))


async def test_request_helper_streams_an_upload(
    glance: GlanceUpstream, glance_peer: GlancePeer
) -> None:
    image_id = glance_peer.create_image(None)
    parts = [secrets.token_bytes(70_000) for _ in range(4)]

    async def upload() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    headers = {"Content-Type": "application/octet-stream"}
    async with await glance.request(
        "PUT", f"/v2/images/{image_id}/file", headers, upload()
    ) as response:
        assert response.status == 204
    async with await glance.request("GET", "/versions", {}) as response:
        assert response.status == 200
        assert "versions" in await response.json()
    assert await collect(glance.stream(image_id)) == b"".join(parts)


async def test_request_helper_refuses_a_relative_path(glance: GlanceUpstream) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        await glance.request("GET", "v2/images", {})


async def test_unreachable_glance_is_an_upstream_error(
    make_settings: Callable[..., Settings],
) -> None:
    from peers import free_port

    upstream = create_upstream(f"glance:http://127.0.0.1:{free_port()}", make_settings())
    try:
        with pytest.raises(UpstreamError) as failed:
            await upstream.check_access("x", Caller())
        assert not isinstance(failed.value, REFUSED)
    finally:
        await upstream.close()


async def test_check_access_cost(glance: GlanceUpstream, glance_peer: GlancePeer) -> None:
    """Measures the ranged file GET against the metadata GET (printed; run with -s)."""
    image_id = glance_peer.create_image(secrets.token_bytes(1 << 20))
    caller = Caller(glance_peer.admin_headers)
    rounds = 30

    async def timed(probe: Callable[[], Awaitable[object]]) -> float:
        await probe()  # warm the connection
        begun = time.perf_counter()
        for _ in range(rounds):
            await probe()
        return (time.perf_counter() - begun) / rounds * 1000

    file_ms = await timed(lambda: glance.check_access(image_id, caller))
    meta_ms = await timed(lambda: glance.info(image_id, caller))
    print(f"\ncheck_access (GET /file, Range 0-0): {file_ms:.2f} ms;", end=" ")
    print(f"info (GET image): {meta_ms:.2f} ms")
    assert file_ms < 1000
    assert meta_ms < 1000
