"""``tcp_cutter``: a loopback TCP forwarder that resets connections mid-response.

Put it between an upstream and any real origin (the http origin, moto, Glance)
to see what the upstream does when the network fails halfway through a body,
without teaching each origin to misbehave.

API::

    cutter = await tcp_cutter("http://127.0.0.1:9292")   # starts forwarding
    cutter.url                  # "http://127.0.0.1:PORT": point the upstream here
    cutter.cut_after = 100_000  # each connection: forward this many response bytes
                                # (headers included), then send a TCP reset
    cutter.cut_after = None     # pass everything through (the default)
    cutter.reset = False        # cut with a clean close (FIN) instead: a short body
    cutter.cuts                 # how many connections were cut so far

A reset discards whatever the client's kernel had received but the client had
not read yet, so how far a slow reader got before it depends on timing; a
clean close delivers every byte forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest

CHUNK = 64 * 1024


class Cutter:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_after: int | None = None
        self.reset = True
        self.cuts = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            origin_r, origin_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)
            self._tasks.discard(task)
            return
        upload = asyncio.create_task(self._pump(client_r, origin_w))
        try:
            await self._download(origin_r, client_w)
        finally:
            upload.cancel()
            with contextlib.suppress(BaseException):
                await upload
            origin_w.close()
            client_w.close()
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

    async def _download(self, origin: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while chunk := await origin.read(CHUNK):
                limit = self.cut_after
                if limit is not None and sent + len(chunk) > limit:
                    client.write(chunk[: limit - sent])
                    await client.drain()
                    self.cuts += 1
                    if self.reset:
                        _reset(client)
                    else:
                        client.close()
                    return
                client.write(chunk)
                await client.drain()
                sent += len(chunk)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # Linger 0 turns close() into an RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture
async def tcp_cutter() -> AsyncIterator[Callable[[str], Awaitable[Cutter]]]:
    """A factory: ``await tcp_cutter(origin_url)`` starts a cutter in front of it."""
    started: list[Cutter] = []

    async def start(origin_url: str) -> Cutter:
        parts = urlsplit(origin_url)
        assert parts.hostname, f"need a host in {origin_url!r}"
        assert parts.port, f"need a port in {origin_url!r}"
        cutter = Cutter(parts.hostname, parts.port)
        await cutter.start()
        started.append(cutter)
        return cutter

    yield start
    for cutter in started:
        await cutter.stop()
