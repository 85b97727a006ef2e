"""Zero-copy sends of a file span: a span the file cannot fill aborts, it never hangs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from imagecache.errors import ImageCacheError
from imagecache.server.send import send_file_span

SIZE = 256 * 1024


async def _serve(aiohttp_server: Any, handler: Any) -> Any:
    """A real server on loopback answering ``GET /span`` with ``handler``."""
    app = web.Application()
    app.router.add_get("/span", handler)
    return await aiohttp_server(app)


async def test_a_span_past_the_end_of_the_file_aborts_the_response(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """os.sendfile stops at end of file; the response must fail, not leave the client waiting.

    Before the fix the short count was ignored: the handler returned normally and
    the client waited forever for the rest of its Content-Length.
    """
    path = tmp_path / "short"
    path.write_bytes(b"x" * SIZE)
    handle = path.open("rb")
    raised: list[BaseException] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        # The body promises twice what the file holds (a file that shrank, or a
        # fill whose bytes never landed).
        response = web.StreamResponse(headers={"Content-Length": str(2 * SIZE)})
        await response.prepare(request)
        try:
            await send_file_span(request, response, handle, 0, 2 * SIZE)
        except ImageCacheError as exc:
            raised.append(exc)
            raise
        return response

    server = await _serve(aiohttp_server, handler)
    timeout = aiohttp.ClientTimeout(total=20)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(server.make_url("/span")) as response:
                    await response.read()
    finally:
        handle.close()
    assert raised, "the short send went unnoticed"
    assert f"ended at byte {SIZE}" in str(raised[0])


async def test_a_span_the_file_holds_is_sent_whole(aiohttp_server: Any, tmp_path: Path) -> None:
    data = bytes(range(256)) * (SIZE // 256)
    path = tmp_path / "whole"
    path.write_bytes(data)
    handle = path.open("rb")

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(SIZE - 1000)})
        await response.prepare(request)
        await send_file_span(request, response, handle, 1000, SIZE - 1000)
        await response.write_eof()
        return response

    server = await _serve(aiohttp_server, handler)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/span")) as response,
        ):
            assert await response.read() == data[1000:]
    finally:
        handle.close()


async def test_a_span_for_a_client_already_leaving_is_a_connection_error(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """A closing transport is a client that left (ConnectionError), not asyncio's RuntimeError.

    server/disconnects.py turns a ConnectionError of a departed client into one
    quiet log line; the RuntimeError("Transport is closing") that asyncio's
    sendfile raises went out as a 500 and a traceback (seen in CI: a follower's
    client left between two spans of a growing file).
    """
    path = tmp_path / "leaving"
    path.write_bytes(bytes(SIZE))
    handle = path.open("rb")
    raised: list[BaseException] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(SIZE)})
        await response.prepare(request)
        assert request.transport is not None
        request.transport.close()  # the client's side is going: closing, not yet gone
        try:
            await send_file_span(request, response, handle, 0, SIZE)
        except BaseException as exc:
            raised.append(exc)
            raise
        return response

    server = await _serve(aiohttp_server, handler)
    try:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.make_url("/span")) as response:
                    await response.read()
    finally:
        handle.close()
    assert len(raised) == 1
    assert isinstance(raised[0], ConnectionError), repr(raised[0])


@pytest.mark.parametrize("promised", [SIZE, 2 * SIZE])
async def test_a_span_is_sent_corked_and_the_socket_uncorked_after(
    aiohttp_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, promised: int
) -> None:
    """Full segments while a span goes out; none of it held back once it has gone.

    Uncorked afterwards even when the span fails (``promised`` past the file's
    end): a socket left corked holds a keep-alive connection's next response
    back for 200 ms.
    """
    path = tmp_path / "file"
    path.write_bytes(b"y" * SIZE)
    handle = path.open("rb")
    corked: dict[str, int] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        send = loop.sendfile

        async def watched(*args: Any, **kwargs: Any) -> int:
            corked["during"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
            return await send(*args, **kwargs)

        monkeypatch.setattr(loop, "sendfile", watched)
        response = web.StreamResponse(headers={"Content-Length": str(promised)})
        await response.prepare(request)
        try:
            await send_file_span(request, response, handle, 0, promised)
        finally:
            corked["after"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)
        await response.write_eof()
        return response

    server = await _serve(aiohttp_server, handler)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            if promised == SIZE:
                async with session.get(server.make_url("/span")) as response:
                    assert await response.read() == b"y" * SIZE
            else:
                with pytest.raises(aiohttp.ClientPayloadError):
                    async with session.get(server.make_url("/span")) as response:
                        await response.read()
    finally:
        handle.close()
    assert corked == {"during": 1, "after": 0}


@pytest.fixture
def tls_context(tmp_path: Path) -> ssl.SSLContext:
    """A server context over a self-signed certificate made by openssl for this test."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_over_tls_a_span_is_copied_through_the_executor_it_is_given(
    aiohttp_server: Any, tmp_path: Path, tls_context: ssl.SSLContext
) -> None:
    """The kernel cannot sendfile into TLS: the span is read with ``run`` and written.

    Before, ``loop.sendfile(..., fallback=False)`` raised RuntimeError on a TLS
    transport, which the copy path did not catch: the response broke.
    """
    data = bytes(range(256)) * (3 * SIZE // 256)
    path = tmp_path / "file"
    path.write_bytes(data)
    handle = path.open("rb")
    reads: list[int] = []

    def run(func: Any, *args: Any) -> asyncio.Future[Any]:
        reads.append(args[1])
        return asyncio.get_running_loop().run_in_executor(None, func, *args)

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(data) - 7)})
        await response.prepare(request)
        await send_file_span(request, response, handle, 7, len(data) - 7, run=run)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/span", handler)
    server = await aiohttp_server(app, ssl=tls_context)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/span"), ssl=False) as response,
        ):
            assert await response.read() == data[7:]
    finally:
        handle.close()
    assert reads, "the copy path read through the executor it was given"
    assert sum(reads) >= len(data) - 7
