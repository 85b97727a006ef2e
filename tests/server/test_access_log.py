"""The access log: one escaped line per request, with the bytes really sent and the request id."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from imagecache.logsafe import EscapingFilter, escape
from imagecache.server.app import AccessLogger
from imagecache.settings import Settings
from polling import eventually
from server_helpers import (
    ServeProcess,
    directory_app,
    image_bytes,
    put_image,
    settled,
    start_serve,
)

ACCESS = re.compile(
    r"remote=(?P<remote>\S+) method=(?P<method>\S+) path=(?P<path>\S+) status=(?P<status>\d+) "
    r"bytes=(?P<bytes>\d+) completed=(?P<completed>yes|no) request_id=(?P<request_id>\S+) "
    r'duration=(?P<duration>[0-9.]+) cache=(?P<cache>-|"[^"]*")'
)


def test_escape_leaves_no_control_character_and_is_reversible_in_reading() -> None:
    raw = "a\nb\rc\td\x00e\x1bf\x7fg\x85h\u2028i\\j"
    shown = escape(raw)
    assert shown == "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\x85h\\u2028i\\\\j"
    assert all(0x20 <= ord(char) < 0x7F for char in shown)
    assert escape("plain/v2/images/abc-123") == "plain/v2/images/abc-123"


def test_the_filter_escapes_arguments_and_keeps_numbers() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s got %d", ("a\nb", 7), None)
    assert EscapingFilter().filter(record)
    assert record.getMessage() == "a\\nb got 7"
    assert EscapingFilter().filter(record)  # a second handler does not escape again
    assert record.getMessage() == "a\\nb got 7"


def test_a_logged_exceptions_message_cannot_forge_a_line() -> None:
    try:
        try:
            raise OSError("inner\n2026-01-01 INFO imagecache.access: forged")
        except OSError as inner:
            raise ValueError("outer\rforged too") from inner
    except ValueError as exc:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), (type(exc), exc, exc.__traceback__)
        )
    assert EscapingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "OSError: inner\\n2026-01-01 INFO imagecache.access: forged" in text
    assert "ValueError: outer\\rforged too" in text
    assert "direct cause" in text
    assert "Traceback (most recent call last):" in text
    assert not [line for line in text.splitlines() if line.startswith("2026-01-01")]
    assert "\r" not in text


async def test_a_path_with_encoded_newlines_writes_exactly_one_line_per_request(
    tmp_path: Path,
) -> None:
    origin = tmp_path / "origin"
    put_image(origin, "img", image_bytes(1000))
    # With an admin token, a call without it is refused and says so in a log line of its own.
    service = await start_serve(
        tmp_path / "cache",
        f"directory:{origin}",
        env={"IMAGECACHE_ADMIN_TOKEN": "a-token-nobody-sends-here"},
    )
    forged = "/v2/images/x%0a2026-01-01%20INFO%20imagecache.access:%20remote=10.0.0.1%0d%0a/file"
    management = "/v2/cache/y%0D%0Amethod=DELETE%0Astatus=204%E2%80%A8"
    try:
        async with aiohttp.ClientSession() as session:
            for path in (forged, management, "/v2/images/img/file"):
                url = URL(service.url + path, encoded=True)  # sent as written, not re-quoted
                async with session.get(url) as response:
                    await response.read()
            # The access line follows the response: wait for all three.

            async def three_lines() -> bool:
                return len(_access_lines(service.log())) >= 3

            await eventually(three_lines, "three access lines are logged", detail=service.log)
    finally:
        await service.stop()
    log = service.log()
    lines = _access_lines(log)
    assert len(lines) == 3, log
    for line in lines:
        assert ACCESS.search(line), line
    # Paths are logged as sent, percent-encoded.
    assert f"path={forged} status=" in lines[0]
    assert f"path={management} status=" in lines[1]
    # No line of the whole log starts with what a caller wrote.
    assert not [line for line in log.splitlines() if line.startswith(("2026-01-01", "method="))]
    # The refused management call's own log line is escaped too.
    refused = [line for line in log.splitlines() if "management call" in line]
    assert len(refused) == 1, log
    assert "/v2/cache/y\\r\\nmethod=DELETE\\nstatus=204\\u2028 " in refused[0], log


def _access_lines(log: str) -> list[str]:
    """The access lines of a text or JSON log, but for ``start_serve``'s health checks."""
    return [
        line
        for line in log.splitlines()
        if (" imagecache.access: " in line or '"logger": "imagecache.access"' in line)
        and "path=/healthcheck " not in line
    ]


@pytest.fixture
async def logged_client(
    aiohttp_client: Any, make_settings: Callable[..., Settings], tmp_path: Path
) -> TestClient[Any, Any]:
    origin = tmp_path / "origin"
    put_image(origin, "big", image_bytes(24 * 1024 * 1024))
    put_image(origin, "small", image_bytes(5000))
    server = TestServer(directory_app(make_settings(), origin))
    await server.start_server(
        access_log_class=AccessLogger, access_log=logging.getLogger("imagecache.access")
    )
    client: TestClient[Any, Any] = await aiohttp_client(server)
    return client


async def _wait_for_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[dict[str, str]]:
    def found() -> list[dict[str, str]]:
        return [
            match.groupdict()
            for record in caplog.records
            if record.name == "imagecache.access"
            and (match := ACCESS.fullmatch(record.getMessage()))
        ]

    await eventually(
        lambda: len(found()) >= count,
        f"{count} access lines are logged",
        detail=lambda: caplog.messages,
    )
    return found()


async def test_a_download_cut_short_logs_the_bytes_sent_and_not_completed(
    logged_client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    size = 24 * 1024 * 1024
    async with logged_client.get("/v2/images/big/file") as response:
        assert len(await response.read()) == size
    await settled(logged_client)
    with caplog.at_level(logging.INFO, logger="imagecache.access"):
        # A hit (sendfile): the client reads 1 MiB and leaves.
        response = await logged_client.get("/v2/images/big/file")
        assert response.status == 200
        await response.content.readexactly(1024 * 1024)
        response.close()
        # A whole hit, for comparison.
        async with logged_client.get("/v2/images/small/file") as whole:
            await whole.read()
        lines = await _wait_for_lines(caplog, 2)
    cut = next(line for line in lines if line["path"] == "/v2/images/big/file")
    assert cut["completed"] == "no", cut
    assert 1024 * 1024 <= int(cut["bytes"]) < size, cut
    small = next(line for line in lines if line["path"] == "/v2/images/small/file")
    assert (small["status"], small["bytes"], small["completed"]) == ("200", "5000", "yes")


async def test_every_response_carries_a_request_id_and_the_access_log_names_it(
    logged_client: TestClient[Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    with caplog.at_level(logging.INFO, logger="imagecache.access"):
        for method, path in (
            ("GET", "/v2/images/small/file"),
            ("HEAD", "/v2/images/small/file"),
            ("GET", "/v2/images/absent/file"),
            ("GET", "/v2/images/bad%7Bid/file"),
            ("GET", "/v2/cache"),
            ("PUT", "/v2/cache/small"),
            ("GET", "/nowhere"),
        ):
            async with logged_client.request(method, URL(path, encoded=True)) as response:
                await response.read()
                request_id = response.headers.get("x-openstack-request-id", "")
                assert re.fullmatch(r"req-[0-9a-f-]{36}", request_id), (method, path)
                seen.append(request_id)
        lines = await _wait_for_lines(caplog, len(seen))
    assert len(set(seen)) == len(seen)
    assert [line["request_id"] for line in lines] == seen
    assert [line["completed"] for line in lines] == ["yes"] * len(seen)


async def test_json_log_lines_parse_and_carry_the_text_lines_fields(tmp_path: Path) -> None:
    """Two real services, text and JSON, answer the same requests; their access lines agree."""
    origin = tmp_path / "origin"
    put_image(origin, "img", image_bytes(5000))
    text, json_service = await asyncio.gather(
        start_serve(tmp_path / "text-cache", f"directory:{origin}"),
        start_serve(
            tmp_path / "json-cache",
            f"directory:{origin}",
            env={"IMAGECACHE_LOG_FORMAT": "json", "IMAGECACHE_LOG_LEVEL": "info"},
        ),
    )
    paths = ("/v2/images/img/file", "/v2/images/absent/file", "/v2/images/x%0a%E2%80%A8y/file")
    seen: dict[str, list[dict[str, str]]] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for name, service in (("text", text), ("json", json_service)):
                seen[name] = []
                for path in paths:
                    async with session.get(URL(service.url + path, encoded=True)) as response:
                        await response.read()
                        seen[name].append(dict(response.headers))

            async def logged(service: ServeProcess) -> bool:
                return len(_access_lines(service.log())) >= len(paths)

            async def both_logged() -> bool:
                return await logged(text) and await logged(json_service)

            await eventually(
                both_logged,
                "both services log every request",
                detail=lambda: (text.log(), json_service.log()),
            )
    finally:
        await asyncio.gather(text.stop(), json_service.stop())
    documents = [json.loads(line) for line in json_service.log().splitlines()]
    assert documents, "the JSON service logged nothing"
    for document in documents:
        assert {"timestamp", "pid", "level", "logger", "message"} <= document.keys(), document
    assert any("serving on http://" in document["message"] for document in documents)
    json_access = [
        d
        for d in documents
        if d["logger"] == "imagecache.access" and "/healthcheck" not in d["path"]
    ]
    text_access = [ACCESS.search(line) for line in _access_lines(text.log())]
    assert len(json_access) == len(text_access) == len(paths)
    for document, text_match, json_headers in zip(
        json_access, text_access, seen["json"], strict=True
    ):
        assert text_match is not None
        # The JSON record's message is the text format's line for the same request.
        own = ACCESS.fullmatch(document["message"])
        assert own is not None, document
        assert {key: document[key] for key in own.groupdict()} == {
            "remote": own["remote"],
            "method": own["method"],
            "path": own["path"],
            "status": int(own["status"]),
            "bytes": int(own["bytes"]),
            "completed": own["completed"] == "yes",
            "request_id": own["request_id"],
            "duration": float(own["duration"]),
            "cache": None if own["cache"] == "-" else own["cache"].strip('"'),
        }
        assert document["request_id"] == json_headers["x-openstack-request-id"]
        assert document["cache"] == json_headers.get("Cache-Status")
        assert (document["level"], document["pid"]) == ("INFO", json_service.process.pid)
        # The text service's line for the same request: the same fields and values
        # but for those unique to each request.
        unique = {"request_id", "duration"}
        assert {k: v for k, v in own.groupdict().items() if k not in unique} == {
            k: v for k, v in text_match.groupdict().items() if k not in unique
        }
    assert json_access[0]["cache"] == "imagecache; fwd=miss; stored"
