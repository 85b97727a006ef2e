"""A worker's connections: header and idle timeouts, the connection bound, the open-file limit.

The service runs in this process as ``imagecache serve`` runs it
(``connections.start_site`` on a listening socket, aiohttp's production
defaults, not its test server's), driven through raw loopback sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import resource
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagecache.server import connections
from imagecache.settings import Settings
from server_helpers import ServeProcess, poll, serve_in_process, start_serve


async def _connect(
    site: connections.GuardedSite,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*site.sock.getsockname()[:2])


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/healthcheck"
) -> bytes:
    """One keep-alive GET; the response's head and body (a short, known body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    match = re.search(rb"(?i)content-length: (\d+)", head)
    assert match, head
    return head + await asyncio.wait_for(reader.readexactly(int(match.group(1))), 10)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closes the connection; fails after ``seconds``."""
    started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(65536), seconds):
            pass
    return time.monotonic() - started


async def test_a_slowloris_header_is_cut_off_after_the_header_timeout(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(header_timeout=0.5, keepalive_timeout=60)
    async with serve_in_process(settings, tmp_path) as site:
        reader, writer = await _connect(site)
        started = time.monotonic()
        closed = asyncio.create_task(_closed_within(reader, 10))
        header = b"GET /healthcheck HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 200
        # A byte every 50 ms: the connection is never idle, the header never complete.
        for byte in header:
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(0.05)
        await closed
        assert closed.done(), "the slow header was still being read after 10 s"
        assert 0.4 < time.monotonic() - started < 3
        writer.close()


async def test_a_slow_second_header_on_a_keepalive_connection_is_cut_off_too(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(header_timeout=0.5, keepalive_timeout=60)
    async with serve_in_process(settings, tmp_path) as site:
        reader, writer = await _connect(site)
        assert (await _request(reader, writer)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        closed = asyncio.create_task(_closed_within(reader, 10))
        for byte in b"GET /healthcheck HTTP/1.1\r\nX-Slow: " + b"a" * 200:
            if closed.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(0.05)
        await closed
        assert 0.4 < time.monotonic() - started < 3
        writer.close()


async def test_a_slow_request_body_is_not_cut_off_by_the_header_timeout(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """The header timeout is for headers: a body (an upload relayed to Glance) may take longer."""
    settings = make_settings(header_timeout=0.3, keepalive_timeout=60)
    async with serve_in_process(settings, tmp_path) as site:
        reader, writer = await _connect(site)
        body = b"{}" + b" " * 8
        writer.write(
            b"POST /v2/cache/verify HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for byte in body:  # ten bytes over a second: three header timeouts long
            await asyncio.sleep(0.1)
            writer.write(bytes([byte]))
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(header_timeout=0.3, keepalive_timeout=60)
    async with serve_in_process(settings, tmp_path) as site:
        reader, writer = await _connect(site)
        assert await _closed_within(reader, 10) < 3
        writer.close()


async def test_an_idle_keepalive_connection_is_closed_after_the_idle_timeout(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(header_timeout=60, keepalive_timeout=0.5)
    async with serve_in_process(settings, tmp_path) as site:
        reader, writer = await _connect(site)
        assert (await _request(reader, writer)).startswith(b"HTTP/1.1 200")
        idle = await _closed_within(reader, 10)
        assert 0.3 < idle < 3
        writer.close()


async def test_beyond_max_connections_a_new_one_gets_a_503_and_the_others_are_served(
    make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(max_connections=2, header_timeout=30, keepalive_timeout=30)
    async with serve_in_process(settings, tmp_path) as site:
        held = [await _connect(site) for _ in range(2)]
        for reader, writer in held:
            assert (await _request(reader, writer)).startswith(b"HTTP/1.1 200")
        refused = []
        for _ in range(3):
            reader, writer = await _connect(site)
            answer = await _request(reader, writer)
            refused.append(answer)
            assert await _closed_within(reader, 5) < 5
            writer.close()
        for answer in refused:
            assert answer.startswith(b"HTTP/1.1 503"), answer
            assert b"Connection: close" in answer
            assert b"max_connections" in answer
        for reader, writer in held:  # the connections in the bound go on being served
            assert (await _request(reader, writer)).startswith(b"HTTP/1.1 200")
        assert site.refused == 3
        metrics = await _request(*held[0], path="/metrics")
        assert b"imagecache_connections_refused_total 3.0" in metrics
        assert b"imagecache_connections_open 2.0" in metrics
        # Three refusals, one warning: the log is rate-limited.
        warnings = [r for r in caplog.records if "refusing connections" in r.getMessage()]
        assert len(warnings) == 1

        held[0][1].close()

        async def admitted() -> bool:
            return site.open_connections < 2

        await poll(admitted, "the closed connection is no longer counted", within=5)
        reader, writer = await _connect(site)
        assert (await _request(reader, writer)).startswith(b"HTTP/1.1 200")
        writer.close()
        held[1][1].close()


def test_the_rate_limited_log_counts_what_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    limited = connections.RateLimitedLog(connections.log, interval=3600)
    for n in range(5):
        limited.warning("accept failed %d", n)
    limited._last -= 3600  # the interval has passed
    limited.warning("accept failed %d", 5)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["accept failed 0", "accept failed 5 (4 more like it in the last 3600 s)"]


async def test_accept_errors_for_lack_of_descriptors_are_logged_once_per_interval(
    make_settings: Callable[..., Settings], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncio reports each failed accept() through the loop's exception handler."""
    async with serve_in_process(make_settings(), tmp_path):
        loop = asyncio.get_running_loop()
        for _ in range(200):  # what a backlog of accepts under EMFILE reports
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": OSError(errno.EMFILE, "Too many open files"),
                }
            )
        loop.call_exception_handler({"message": "something else entirely"})
    accept = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(accept) == 1
    assert "Too many open files" in accept[0].getMessage()
    assert not accept[0].exc_info  # one line, no traceback
    assert any("something else entirely" in r.getMessage() for r in caplog.records)


def _lower_open_file_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))


def _open_file_limits(pid: int) -> str:
    limits = Path(f"/proc/{pid}/limits").read_text()
    return next(line for line in limits.splitlines() if line.startswith("Max open files"))


async def test_serve_raises_its_open_file_limit_to_the_hard_limit(
    tmp_path: Path, servers: list[ServeProcess]
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 512:
        pytest.skip(f"the hard RLIMIT_NOFILE here is {hard}: nothing to raise it to")
    root = tmp_path / "images"
    root.mkdir()
    server = await start_serve(
        tmp_path / "cache", f"directory:{root}", preexec_fn=_lower_open_file_limit
    )
    servers.append(server)
    line = _open_file_limits(server.process.pid)
    assert line.split()[3:5] == [str(hard), str(hard)], line
    assert f"raised the open-file limit (RLIMIT_NOFILE) from 512 to {hard}" in server.log()
