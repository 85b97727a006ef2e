"""What a client sees for each error answer: status, the headers it acts on, and the message.

The answers are made in one place (``server/app.py``'s ``_errors`` middleware
and its ``STATUS`` table) from the errors handlers raise; this pins them, as
they were when handlers still raised aiohttp's ``web.HTTP*`` themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from imagecache.settings import Settings
from server_helpers import directory_app, image_bytes, put_image

ClientFactory = Callable[..., Any]
HTML = "text/html; charset=utf-8"
NEEDS_CLUSTER = (
    "centralized caching is not enabled: listing every node's cache (all_nodes=true)"
    " needs cluster mode: set image_cache_driver = 'central' and database_url"
)
NOT_ALLOWED = "The method is not allowed for this resource."

# (method, path, request headers, body) -> (status, response headers, message)
CASES: list[tuple[str, str, dict[str, str], bytes, int, dict[str, str], str]] = [
    ("POST", "/v2/cache", {}, b"", 405, {"Allow": "DELETE,GET"}, NOT_ALLOWED),
    ("PUT", "/v2/cache/img-1/pin", {}, b"", 404, {}, "image img-1 is not cached"),
    ("POST", "/v2/cache/stats", {}, b"", 405, {"Allow": "GET"}, NOT_ALLOWED),
    (
        "GET",
        "/v2/images/img-1/file",
        {"Range": "bytes=0-1,3-4"},
        b"",
        400,
        {},
        "bad Range header: multiple ranges are not supported; ask for one range",
    ),
    (
        "GET",
        "/v2/images/img-1/file",
        {"Range": "bytes=5000-"},
        b"",
        416,
        {"Content-Range": "bytes */4096"},
        "range not satisfiable: the image has 4096 bytes",
    ),
    ("GET", "/v2/cache?all_nodes=maybe", {}, b"", 400, {}, "all_nodes must be true or false"),
    ("GET", "/v2/cache?all_nodes=true", {}, b"", 409, {}, NEEDS_CLUSTER),
    ("GET", "/v2/cache/nodes/img-1", {}, b"", 409, {}, "centralized caching is not enabled"),
    (
        "DELETE",
        "/v2/cache",
        {"x-image-cache-clear-target": "all"},
        b"",
        400,
        {},
        "x-image-cache-clear-target must be 'cache', 'queue' or empty, not 'all'",
    ),
    ("PUT", "/v2/cache/..bad", {}, b"", 400, {}, "invalid image id '..bad'"),
    ("GET", "/v2/images/..bad/file", {}, b"", 400, {}, "invalid image id '..bad'"),
    ("PUT", "/v2/cache/nope", {}, b"", 404, {}, "image 'nope' not found upstream"),
    ("DELETE", "/v2/cache/nope", {}, b"", 404, {}, "image nope is not cached, queued or known"),
    ("POST", "/v2/cache/verify", {}, b"[", 400, {}, "the body must be JSON: Expecting value"),
    ("POST", "/v2/cache/verify", {}, b"[" * 100_000, 400, {}, "the body is JSON nested too deeply"),
    ("POST", "/v2/cache/verify", {}, b"[1]", 400, {}, "the body must be a JSON object"),
    ("POST", "/v2/cache/verify", {}, b'{"image_id": "nope"}', 404, {}, "image nope is not cached"),
    ("POST", "/v2/cache/verify", {}, b'{"image_id": 7}', 400, {}, "invalid image id 7"),
    ("GET", "/v2/images", {}, b"", 404, {}, "/v2/images needs a glance upstream"),
    ("GET", "/nothere", {}, b"", 404, {}, "The resource could not be found."),
]


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> TestClient[Any, Any]:
    put_image(tmp_path / "origin", "img-1", image_bytes(4096))
    client: TestClient[Any, Any] = await aiohttp_client(
        directory_app(make_settings(), tmp_path / "origin")
    )
    return client


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "answer_headers", "message"),
    CASES,
    ids=[f"{case[0]} {case[1]} {case[4]}" for case in CASES],
)
async def test_error_answers(
    client: TestClient[Any, Any],
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    status: int,
    answer_headers: dict[str, str],
    message: str,
) -> None:
    async with client.request(method, path, headers=headers, data=body or None) as response:
        text = await response.text()
        assert response.status == status, text
        assert response.headers["Content-Type"] == HTML
        for name, value in answer_headers.items():
            assert response.headers[name] == value
        assert f"<h1>{status} {response.reason}</h1>\n  {message}" in text


async def test_an_error_body_is_webobs_html(client: TestClient[Any, Any]) -> None:
    async with client.put("/v2/cache/img-1/pin") as response:
        assert await response.text() == (
            "<html>\n <head>\n  <title>404 Not Found</title>\n </head>\n <body>\n"
            "  <h1>404 Not Found</h1>\n  image img-1 is not cached<br /><br />\n\n\n\n"
            " </body>\n</html>"
        )


async def test_json_when_the_client_prefers_it(client: TestClient[Any, Any]) -> None:
    async with client.post("/v2/cache/stats", headers={"Accept": "application/json"}) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
        assert await response.json() == {
            "message": NOT_ALLOWED,
            "code": "405 Method Not Allowed",
            "title": "Method Not Allowed",
        }


async def test_get_v2_redirects_as_glance_does(client: TestClient[Any, Any]) -> None:
    async with client.get("/v2", allow_redirects=False) as response:
        assert response.status == 302
        assert response.headers["Location"] == f"{client.make_url('/v2/')}"
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await response.text() == "302: Found"


async def test_a_caller_who_is_not_admin_is_refused(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(admin_token="an-admin-token-of-some-length")
    client = await aiohttp_client(directory_app(settings, tmp_path))
    for headers in ({}, {"X-Auth-Token": "wrong"}):
        async with client.get("/v2/cache", headers=headers) as response:
            assert response.status == 403
            assert "the cache API needs an admin caller" in await response.text()
