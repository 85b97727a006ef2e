"""Service plumbing: health, metrics, the access log, non-Glance metadata, ids at the edge."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imagecache.layout import CacheLayout
from imagecache.server.app import AccessLogger
from imagecache.settings import Settings
from polling import eventually
from server_helpers import directory_app, filled, image_bytes, listdir, put_image, settled

ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]
DATA = image_bytes(100_000)
TOKEN = "very-secret-token-value"


@pytest.fixture
def origin_root(tmp_path: Path) -> Path:
    root = tmp_path / "origin"
    put_image(root, "img", DATA)
    return root


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin_root: Path
) -> TestClient[Any, Any]:
    # The runner options serve() uses, so the access log is the service's own.
    server = TestServer(directory_app(make_settings(), origin_root))
    await server.start_server(
        access_log_class=AccessLogger, access_log=logging.getLogger("imagecache.access")
    )
    return await aiohttp_client(server)


async def test_healthcheck(client: TestClient[Any, Any]) -> None:
    async with client.get("/healthcheck") as response:
        assert (response.status, await response.text()) == (200, "OK")


async def test_metrics_count_misses_hits_bypasses_and_bytes(client: TestClient[Any, Any]) -> None:
    for _ in range(2):
        async with client.get("/v2/images/img/file") as response:
            await response.read()
        await settled(client)
    async with client.get("/v2/images/img/file", headers={"Range": "bytes=0-9"}) as response:
        await response.read()
    await client.delete("/v2/cache/img")
    # A range of the uncached image starts its fill (range_starts_fill): a miss.
    async with client.get("/v2/images/img/file", headers={"Range": "bytes=0-9"}) as response:
        await response.read()
    await filled(client, "img")
    async with client.get("/metrics") as response:
        assert response.status == 200
        text = await response.text()
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["imagecache_misses_total"] == 2
    assert values["imagecache_hits_total"] == 1
    assert not any(name.startswith("imagecache_bypasses_total") for name in values)
    assert values["imagecache_bytes_from_cache_total"] == len(DATA) + 10 + 10
    assert values["imagecache_bytes_from_upstream_total"] == 2 * len(DATA)
    assert values["imagecache_fills_in_flight"] == 0
    assert values['imagecache_fill_seconds_count{outcome="committed"}'] == 2


async def test_two_apps_have_separate_registries(
    make_settings: Callable[..., Settings], origin_root: Path
) -> None:
    first = directory_app(make_settings(), origin_root)
    second = directory_app(make_settings(), origin_root)  # no "duplicated timeseries" error
    assert first is not second


async def test_access_log_has_one_line_per_request_and_no_token(
    client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="imagecache.access"):
        async with client.get(
            "/v2/images/img/file", headers={"X-Auth-Token": TOKEN, "X-Roles": "admin"}
        ) as response:
            await response.read()
        async with client.get("/v2/cache", headers={"X-Auth-Token": TOKEN}) as response:
            await response.read()
        # The line is written once the response is out, which may be after the
        # client has read it: wait for it (with a deadline).
        await eventually(
            lambda: len(access_lines(caplog)) >= 2,
            "both access lines are logged",
            within=5,
            detail=lambda: caplog.messages,
        )
    lines = access_lines(caplog)
    assert len(lines) == 2
    assert re.fullmatch(
        r"remote=127\.0\.0\.1 method=GET path=/v2/images/img/file status=200 bytes=100000 "
        r"completed=yes request_id=req-[0-9a-f-]{36} duration=[0-9.]+"
        r' cache="imagecache; fwd=miss; stored"',
        lines[0],
    ), lines[0]
    assert all(TOKEN not in line for line in caplog.messages)


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imagecache.access"]


async def test_image_metadata_is_synthesised_for_non_glance_origins(
    client: TestClient[Any, Any],
) -> None:
    async with client.get("/v2/images/img") as response:
        assert response.status == 200
        image = await response.json()
    assert (image["id"], image["status"], image["size"]) == ("img", "active", len(DATA))
    assert image["os_hash_algo"] == "sha256"
    async with client.get("/v2/images/missing") as response:
        assert response.status == 404
    # glanceclient's first run needs the schemas (server/schemas.py): our own here.
    async with client.get("/v2/schemas/image") as response:
        assert response.status == 200
        schema = await response.json()
    assert set(image) <= set(schema["properties"]), "the schema describes the document"
    async with client.get("/v2/tasks") as response:
        assert response.status == 404  # nothing to relay to without a Glance origin


async def test_versions_without_glance(client: TestClient[Any, Any]) -> None:
    async with client.get("/versions") as response:
        versions = {v["id"]: v["status"] for v in (await response.json())["versions"]}
    assert versions["v2.18"] == "CURRENT"
    async with client.get("/") as response:
        assert response.status == 300


_ids = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["..", ".", "incomplete", "queue", "invalid", "cache.db", "a/../b"]),
    st.text(alphabet="./%2eEfF0", max_size=20),
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_ids)
async def test_any_id_at_the_edge_is_served_refused_or_unknown_never_a_path_outside(
    client: TestClient[Any, Any], cache_dir: Path, raw: str
) -> None:
    from urllib.parse import quote

    url = client.make_url("/").with_path(f"/v2/images/{quote(raw, safe='')}/file", encoded=True)
    async with client.session.get(url) as response:
        body = await response.read()
        if response.status == 200:
            assert raw == "img"
            assert body == DATA
        else:
            # 400: refused at the edge; 404: a valid id the origin does not have.
            assert response.status in (400, 404), (raw, response.status)
            if CacheLayout(cache_dir).is_valid(raw):
                assert response.status == 404, raw
            elif raw and "/" not in raw:
                assert response.status == 400, raw  # never handed to the upstream
    # Nothing was ever written outside the cache's own directories.
    assert set(listdir(cache_dir)) <= {"img", "incomplete", "invalid", "queue", ".locks"} | {
        name for name in listdir(cache_dir) if name.startswith("cache.db")
    }
