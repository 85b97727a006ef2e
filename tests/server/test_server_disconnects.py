"""A client that leaves in the middle of a body: normal, so one quiet log line, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from imagecache.server.connections import GuardedSite
from imagecache.server.state import STATE
from imagecache.settings import Settings
from server_helpers import poll, put_image, serve_in_process

# Beyond what the server's send buffer (tcp_wmem's largest, 4 MiB by default)
# and the client's small receive buffer hold: the body is still going when it leaves.
SIZE = 16 * 1024 * 1024
DATA = b"imagecache bytes" * (SIZE // 16)


async def _leave_mid_body(port: int, path: str) -> None:
    """GET on a real socket, read the first bytes of the body, and close."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.read(65536), 10)
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


@pytest.mark.parametrize("warm", [True, False], ids=["hit", "fill"])
async def test_a_client_leaving_mid_body_logs_one_info_line_and_no_traceback(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    warm: bool,
) -> None:
    root = tmp_path / "images"
    put_image(root, "img", DATA)
    async with serve_in_process(make_settings(), root) as site:
        await _leave_and_look(site, warm, caplog)


async def _leave_and_look(site: GuardedSite, warm: bool, caplog: pytest.LogCaptureFixture) -> None:
    host, port = site.sock.getsockname()[:2]
    url = f"http://{host}:{port}/v2/images/img/file"
    if warm:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert len(await response.read()) == SIZE
        await site.app[STATE].fills.settled()
    caplog.set_level(logging.INFO)
    caplog.clear()
    await _leave_mid_body(port, "/v2/images/img/file")

    def left() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "left before the response" in r.getMessage()]

    async def noticed() -> bool:
        return bool(left())

    await poll(noticed, "the server noticed the client leaving", within=10)
    # The fill the leaving client started still ends (and commits) on its own.
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert len(await response.read()) == SIZE
    await site.app[STATE].fills.settled()
    assert [r.levelno for r in left()] == [logging.INFO]
    assert "'/v2/images/img/file'" in left()[0].getMessage()
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
