"""The accept loop of a worker among several (server/spread.py), in this process.

A real listening socket and a real descriptor limit; one worker's ``Turn``
with the other slot never started, so it takes every connection.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from imagecache.server import spread
from polling import eventually


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


async def test_an_accept_out_of_descriptors_is_reported_and_retried(
    listening: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spread, "ACCEPT_RETRY_DELAY", 0.05)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    made: list[asyncio.BaseTransport] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    client = socket.create_connection(listening.getsockname())  # queued, not accepted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    free = os.open(os.devnull, os.O_RDONLY)
    os.close(free)
    acceptor = spread.Acceptor(listening, spread.Loads(2).turn(0), Probe)
    try:
        # No descriptor number left below the limit: accept() fails with EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))
        try:
            await eventually(lambda: bool(reported), "the failed accept is reported")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert reported[0]["message"] == "socket.accept() out of system resource"
        assert isinstance(reported[0]["exception"], OSError)
        await eventually(lambda: bool(made), "the connection is accepted once descriptors free up")
    finally:
        acceptor.stop()
        client.close()
        loop.set_exception_handler(None)
        for transport in made:
            transport.close()
