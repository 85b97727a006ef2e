"""``http_origin``: a small aiohttp image origin on a real loopback socket, with fault hooks.

It serves ``GET``/``HEAD /images/<name>`` from a temporary directory with
``Content-Length`` and ``Content-MD5`` (hex, as Glance sends it) and single
byte ranges (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``). It runs in the test's
own event loop, so tests can steer it with ``asyncio.Event``s.

API (``origin = http_origin``)::

    origin.url                      # "http://127.0.0.1:PORT"
    origin.template                 # "http://127.0.0.1:PORT/images/{image_id}"
                                    #   -> create_upstream("http:" + origin.template, ...)
    origin.root                     # the directory served (files may be written directly)
    origin.add("img", data, sidecars=("sha256",), content_md5=True, honour_range=True)
                                    # writes root/img (+ root/img.sha256); returns its OriginImage
    origin.image("img")             # the OriginImage: per-image state and hooks below
    origin.body_reads("img")        # GET requests that started sending the body (HEAD not counted)
    origin.bytes_sent("img")        # body bytes written for that path, all requests together
    origin.fail("img", Fault.RESET, after=1000)
                                    # next GETs send 1000 body bytes, then a TCP reset
    origin.fail("img", Fault.SHORT, after=1000)
                                    # ... then a clean close: fewer bytes than Content-Length
    origin.fail("img", Fault.RESET, after=10, start=4096)
                                    # only bodies (ranges) starting at byte 4096 or later
    origin.fail("img", None)        # back to healthy
    gate = origin.gate("img", after=0)
                                    # GETs send headers + `after` body bytes, then wait
                                    # until `gate.set()` (an asyncio.Event in the test's loop);
                                    # after=len(data) holds only the end of the body
    gate = origin.gate("img", after=0, below=2**20)
                                    # ... only bodies (ranges) that start below byte 2**20;
                                    #   a new gate replaces the old for bodies held at it
                                    #   too, from their next chunk once the old one is set
    origin.image("img").rate = 4 * 2**20
                                    # each GET's body paced at 4 MiB/s (a slow, far origin)
    await origin.wait_for_reads("img", n, within=5.0)
                                    # poll until n body reads started (no sleeps in tests)
    origin.allow_head = False       # HEAD answers 405, as Glance's file route does
    origin.add("img", data, chunked=True)
                                    # no Content-Length, on HEAD or GET: the body is
                                    #   chunked (ranges still answer 206 + Content-Range)
    origin.requests                 # [(method, path, headers)] in arrival order

Images not registered with ``add`` but present in ``root`` are served too,
with default (healthy) behaviour.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import itertools
import re
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Fault(enum.Enum):
    """How a GET body goes wrong after ``after`` bytes."""

    RESET = "reset"  # TCP RST: the client sees a connection reset
    SHORT = "short"  # clean close before Content-Length bytes were sent


@dataclass
class OriginImage:
    """Per-path state and hooks of the origin."""

    content_md5: bool = True
    honour_range: bool = True
    chunked: bool = False
    fault: Fault | None = None
    fault_after: int = 0
    # The fault breaks only bodies that start at or after this byte (ranges).
    fault_from: int = 0
    gate: asyncio.Event | None = None
    gate_after: int = 0
    # The gate holds only bodies that start below this byte (ranges); None: every body.
    gate_below: int | None = None
    rate: float = 0.0  # body bytes per second per request; 0: as fast as the socket takes them
    body_reads: int = 0
    bytes_sent: int = 0


@dataclass
class Origin:
    """The running origin; see the module docstring for the API."""

    root: Path
    url: str = ""
    allow_head: bool = True
    images: dict[str, OriginImage] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    @property
    def template(self) -> str:
        return f"{self.url}/images/{{image_id}}"

    def image_url(self, name: str) -> str:
        return f"{self.url}/images/{name}"

    def image(self, name: str) -> OriginImage:
        return self.images.setdefault(name, OriginImage())

    def add(
        self,
        name: str,
        data: bytes,
        *,
        sidecars: tuple[str, ...] = (),
        content_md5: bool = True,
        honour_range: bool = True,
        chunked: bool = False,
    ) -> OriginImage:
        (self.root / name).write_bytes(data)
        for algo in sidecars:
            digest = hashlib.new(algo, data).hexdigest()
            (self.root / f"{name}.{algo}").write_text(f"{digest}  {name}\n")
        state = self.image(name)
        state.content_md5 = content_md5
        state.honour_range = honour_range
        state.chunked = chunked
        return state

    def body_reads(self, name: str) -> int:
        return self.image(name).body_reads

    def bytes_sent(self, name: str) -> int:
        return self.image(name).bytes_sent

    def fail(self, name: str, fault: Fault | None, after: int = 0, start: int = 0) -> None:
        state = self.image(name)
        state.fault, state.fault_after, state.fault_from = fault, after, start

    def gate(self, name: str, after: int = 0, below: int | None = None) -> asyncio.Event:
        state = self.image(name)
        state.gate, state.gate_after, state.gate_below = asyncio.Event(), after, below
        return state.gate

    async def wait_for_reads(self, name: str, count: int, within: float = 5.0) -> None:
        deadline = time.monotonic() + within
        while self.body_reads(name) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"origin saw {self.body_reads(name)} body reads of {name!r}, expected {count}"
                )
            await asyncio.sleep(0.01)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append((request.method, request.path, dict(request.headers)))
        path = self.root / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound()
        if request.method == "HEAD" and not self.allow_head:
            raise web.HTTPMethodNotAllowed("HEAD", ["GET"])
        data = await asyncio.to_thread(path.read_bytes)
        state = self.image(name)
        start, end = 0, len(data)
        status = 200
        headers = {"Accept-Ranges": "bytes"}
        if state.content_md5:
            headers["Content-MD5"] = hashlib.md5(data).hexdigest()
        asked = request.headers.get("Range")
        if asked and state.honour_range:
            bounds = _parse_range(asked, len(data))
            if bounds is None:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{len(data)}"}
                )
            start, end = bounds
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        response = web.StreamResponse(status=status, headers=headers)
        if state.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = end - start
        await response.prepare(request)
        if request.method == "HEAD":
            await response.write_eof()
            return response
        state.body_reads += 1
        await self._send(request, response, state, data[start:end], start)
        return response

    async def _send(
        self,
        request: web.Request,
        response: web.StreamResponse,
        state: OriginImage,
        body: bytes,
        offset: int,
    ) -> None:
        sent = 0
        fault = state.fault if offset >= state.fault_from else None
        began = time.monotonic()
        for chunk in _chunks(body, state):
            held = state.gate_below is None or offset < state.gate_below
            if state.gate is not None and sent >= state.gate_after and held:
                await state.gate.wait()
            if state.rate > 0:
                # Pacing, not synchronisation: the body goes out no faster than ``rate``.
                ahead = began + sent / state.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if fault is not None and sent + len(chunk) > state.fault_after:
                chunk = chunk[: state.fault_after - sent]
                if chunk:
                    await response.write(chunk)
                    state.bytes_sent += len(chunk)
                _break_connection(request, response, fault)
                return
            await response.write(chunk)
            sent += len(chunk)
            state.bytes_sent += len(chunk)
        held = state.gate_below is None or offset < state.gate_below
        if state.gate is not None and state.gate_after >= len(body) > 0 and held:
            # A gate at the very end holds the body's end (the terminating
            # chunk of a chunked body) once every byte is out.
            await state.gate.wait()


def _chunks(body: bytes, state: OriginImage) -> list[bytes]:
    # Cut at the gate and fault offsets too, so "after N bytes" is exact.
    cuts = {0, len(body)}
    cuts.update(x for x in (state.gate_after, state.fault_after) if 0 < x < len(body))
    cuts.update(range(0, len(body), CHUNK))
    edges = sorted(cuts)
    return [body[a:b] for a, b in itertools.pairwise(edges)] or [b""]


def _break_connection(request: web.Request, response: web.StreamResponse, fault: Fault) -> None:
    transport = request.transport
    assert transport is not None
    if fault is Fault.RESET:
        sock = transport.get_extra_info("socket")
        # Linger 0 turns close() into an RST instead of a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        response.force_close()
        transport.close()


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    match = _RANGE.match(value.strip())
    if not match or not (match.group(1) or match.group(2)):
        return None
    first, last = match.groups()
    if not first:
        count = int(last)
        return (max(0, size - count), size) if count else None
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    return (start, end) if start < size and start < end else None


@pytest.fixture
async def http_origin(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Origin]:
    """A running origin in the test's loop, on a free loopback port."""
    origin = Origin(root=tmp_path_factory.mktemp("origin"))
    app = web.Application()
    app.router.add_route("GET", "/images/{name}", origin.handle)
    app.router.add_route("HEAD", "/images/{name}", origin.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    origin.url = f"http://{host}:{port}"
    try:
        yield origin
    finally:
        # Open a gate a test left closed, so shutdown does not wait on it.
        for state in origin.images.values():
            if state.gate is not None:
                state.gate.set()
        await runner.cleanup()
