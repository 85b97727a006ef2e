"""Real clients against the service: glanceclient's cache-list, openstacksdk's error messages,
the versions document and ``GET /v2`` as Glance gives them, failures said in words.

python-glanceclient and openstacksdk are in the dev extra; the tests skip loudly without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from central_db import postgres_url, require_postgres
from imagecache.server.app import AccessLogger, create_app
from imagecache.settings import Settings
from polling import eventually
from server_helpers import directory_app, image_bytes, put_image

GLANCE_CLI = Path(sys.executable).parent / "glance"
DATA = image_bytes(20_000, seed=9)


@pytest.fixture
async def service(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> AsyncIterator[TestServer]:
    origin = tmp_path / "origin"
    put_image(origin, "img", DATA)
    server = TestServer(directory_app(make_settings(queue_interval=0), origin))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def _base(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def _run(*command: str, home: Path | None = None) -> tuple[int, str, str]:
    # ``home``: a user's first run. glanceclient keeps the schemas it downloads
    # in ~/.glanceclient and never asks again, so a shared HOME hides what a
    # new user's first command does.
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if home is not None:
        env["HOME"] = str(home)  # need not exist: glanceclient makes ~/.glanceclient
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"CLIENT MISSING: {module} is not installed; `make install` (dev extra)")


async def test_glance_cache_list_shows_each_queued_image_once(
    service: TestServer, tmp_path: Path
) -> None:
    _require("glanceclient")
    if not GLANCE_CLI.exists():
        pytest.skip(f"CLIENT MISSING: no glance command at {GLANCE_CLI}")
    async with aiohttp.ClientSession() as session:
        # The legacy route only writes the queue marker: the image stays queued.
        async with session.put(f"{_base(service)}/v2/queued_images/img") as response:
            assert response.status == 200
        async with session.get(f"{_base(service)}/v2/cache") as response:
            document = await response.json()
        async with session.get(f"{_base(service)}/v2/cache?details=true") as response:
            detailed = await response.json()
    assert set(document) == {"cached_images", "queued_images"}
    assert document["queued_images"] == ["img"]
    assert [entry["image_id"] for entry in detailed["queued_details"]] == ["img"]
    code, out, err = await _run(
        str(GLANCE_CLI),
        "--os-image-url",
        _base(service),
        "--os-auth-token",
        "x",
        "cache-list",
        home=tmp_path / "home",
    )
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("|") and "queued" in line]
    assert len(rows) == 1, out
    assert rows[0].split("|")[1].strip() == "img"
    assert "falling back to v1" not in err
    # What the client kept for its next runs: this service's schemas.
    kept = json.loads((tmp_path / "home" / ".glanceclient" / "image_schema.json").read_text())
    assert kept["name"] == "image"
    assert "os_hash_value" in kept["properties"]


async def test_glance_image_download_on_a_first_run(service: TestServer, tmp_path: Path) -> None:
    _require("glanceclient")
    if not GLANCE_CLI.exists():
        pytest.skip(f"CLIENT MISSING: no glance command at {GLANCE_CLI}")
    target = tmp_path / "img.raw"
    code, _, err = await _run(
        str(GLANCE_CLI),
        "--os-image-url",
        _base(service),
        "--os-auth-token",
        "x",
        "image-download",
        "img",
        "--file",
        str(target),
        home=tmp_path / "home",
    )
    assert code == 0, err
    assert target.read_bytes() == DATA


@pytest.mark.parametrize(
    "name", ["image", "images", "metadefs/namespace", "metadefs/resource_type"]
)
async def test_schemas_of_a_non_glance_origin(service: TestServer, name: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{_base(service)}/v2/schemas/{name}") as response,
    ):
        assert response.status == 200
        document = await response.json()
    assert document["name"] == name.rsplit("/", 1)[-1]
    assert isinstance(document["properties"], dict)


async def test_unknown_schema_is_404_naming_the_known_ones(service: TestServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{_base(service)}/v2/schemas/nosuch") as response,
    ):
        assert response.status == 404
        text = await response.text()
    assert "nosuch" in text
    assert "metadefs/namespace" in text


_SDK_ERROR = """
import sys
import openstack
conn = openstack.connect(
    auth_type="none", image_endpoint_override=sys.argv[1], region_name="RegionOne"
)
try:
    conn.image.download_image(sys.argv[2])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize(
    ("image_id", "exception", "message"),
    [
        ("nosuch", "NotFoundException", "image 'nosuch' not found upstream"),
        ("bad{id", "BadRequestException", "invalid image id 'bad{id'"),
    ],
)
async def test_openstacksdk_shows_the_services_error_message(
    service: TestServer, image_id: str, exception: str, message: str
) -> None:
    _require("openstack")
    code, out, err = await _run(sys.executable, "-c", _SDK_ERROR, _base(service), image_id)
    assert code == 0, err
    assert out.startswith(exception), out
    assert message in out, out


async def test_error_bodies_are_glances_html_or_json_with_the_message(service: TestServer) -> None:
    url = f"{_base(service)}/v2/images/nosuch/file"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 404
            assert response.content_type == "text/html"
            assert "<h1>404 Not Found</h1>" in await response.text()
            assert response.headers["x-openstack-request-id"].startswith("req-")
        async with session.get(url, headers={"Accept": "application/json"}) as response:
            assert response.status == 404
            body = await response.json()
    assert body["title"] == "Not Found"
    assert body["code"] == "404 Not Found"
    assert "nosuch" in body["message"]


# --- /versions and GET /v2 through a Glance origin ----------------------------------------


@pytest.fixture
async def versions_origin(aiohttp_server: Any) -> Any:
    """An origin answering /versions the way Glance does: with its own address in the links."""

    async def versions(request: web.Request) -> web.StreamResponse:
        own = f"http://{request.host}"
        return web.json_response(
            {
                "versions": [
                    {
                        "id": "v2.9",
                        "status": "CURRENT",
                        "links": [{"rel": "self", "href": f"{own}/v2/"}],
                    },
                    {
                        "id": "v2.1",
                        "status": "SUPPORTED",
                        "links": [{"rel": "self", "href": f"{own}/v2/"}],
                    },
                ]
            }
        )

    app = web.Application()
    app.router.add_get("/versions", versions)
    return await aiohttp_server(app)


@pytest.mark.parametrize("public_url", [None, "https://cache.edge.example:8443/images"])
async def test_versions_and_the_v2_redirect_name_this_service(
    versions_origin: Any, make_settings: Callable[..., Settings], public_url: str | None
) -> None:
    origin_base = str(versions_origin.make_url("")).rstrip("/")
    settings = make_settings(upstream=f"glance:{origin_base}", public_url=public_url)
    proxy = TestServer(create_app(settings))
    await proxy.start_server()
    expected = public_url or _base(proxy)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{_base(proxy)}/versions") as response:
                document = await response.json()
            async with session.get(f"{_base(proxy)}/v2", allow_redirects=False) as response:
                status, location = response.status, response.headers.get("Location")
    finally:
        await proxy.close()
    hrefs = {link["href"] for entry in document["versions"] for link in entry["links"]}
    assert hrefs == {f"{expected}/v2/"}, json.dumps(document)
    assert origin_base not in json.dumps(document)
    # Glance answers GET /v2 with 302 and an absolute Location of /v2/.
    assert (status, location) == (302, f"{expected}/v2/")


async def test_a_relayed_response_keeps_the_origins_request_id(
    aiohttp_server: Any, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    origin_id = "req-00000000-1111-2222-3333-444444444444"

    async def images(request: web.Request) -> web.StreamResponse:
        return web.json_response({"images": []}, headers={"x-openstack-request-id": origin_id})

    app = web.Application()
    app.router.add_get("/v2/images", images)
    origin = await aiohttp_server(app)
    settings = make_settings(upstream=f"glance:{str(origin.make_url('')).rstrip('/')}")
    proxy = TestServer(create_app(settings))
    await proxy.start_server(
        access_log_class=AccessLogger, access_log=logging.getLogger("imagecache.access")
    )
    try:
        with caplog.at_level(logging.INFO, logger="imagecache.access"):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{_base(proxy)}/v2/images") as response,
            ):
                assert response.status == 200
                assert response.headers.getall("x-openstack-request-id") == [origin_id]
            await eventually(
                lambda: any(origin_id in message for message in caplog.messages),
                "the origin's request id is logged",
                within=5,
                detail=lambda: caplog.messages,
            )
    finally:
        await proxy.close()


# --- failures said in words ------------------------------------------------------------------


def _closed_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once closed


async def test_a_502_says_what_failed_in_words(make_settings: Callable[..., Settings]) -> None:
    port = _closed_port()
    settings = make_settings(upstream=f"glance:http://127.0.0.1:{port}")
    proxy = TestServer(create_app(settings))
    await proxy.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{_base(proxy)}/v2/images/img/file") as response,
        ):
            status, text = response.status, await response.text()
    finally:
        await proxy.close()
    assert status == 502
    assert f"cannot connect to 127.0.0.1:{port}" in text, text
    assert "Glance" in text
    assert "ConnectionKey" not in text
    assert "Error(" not in text


async def test_a_failed_start_says_why_and_never_that_it_serves(tmp_path: Path) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        code, out, err = await _serve(tmp_path / "a", origin, "--port", str(port))
    assert code == 1
    assert f"127.0.0.1:{port}" in err
    assert "Address already in use" in err
    assert "serving on" not in out + err
    # A cluster node whose database does not exist.
    require_postgres()
    missing = postgres_url("imagecache_no_such_database")
    code, out, err = await _serve(
        tmp_path / "b",
        origin,
        "--port",
        "0",
        env={
            "IMAGECACHE_IMAGE_CACHE_DRIVER": "central",
            "IMAGECACHE_DATABASE_URL": missing,
            "IMAGECACHE_WORKER_SELF_REFERENCE_URL": "http://127.0.0.1:9",
        },
    )
    assert code != 0, out + err
    assert "serving on" not in out + err


async def _serve(
    cache: Path, origin: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    imagecache = shutil.which("imagecache", path=str(Path(sys.executable).parent))
    assert imagecache is not None
    process = await asyncio.create_subprocess_exec(
        imagecache,
        "serve",
        "--cache-dir",
        str(cache),
        "--upstream",
        f"directory:{origin}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "IMAGECACHE_LOG_LEVEL": "INFO", **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
