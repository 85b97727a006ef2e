"""Helpers for the service tests: apps over a directory upstream, image data, serve processes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.fill.flight import Flight
from imagecache.fill.hooks import NO_HOOKS, FillHooks
from imagecache.server.app import create_app
from imagecache.server.connections import GuardedSite, start_site
from imagecache.server.run import _listen
from imagecache.server.state import STATE
from imagecache.settings import Settings
from imagecache.upstreams.directory import DirectoryUpstream
from polling import eventually


def image_bytes(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def put_image(root: Path, image_id: str, data: bytes, *, sidecar: str | None = "sha256") -> None:
    """Write an image (and its digest sidecar) into a directory upstream's root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / image_id).write_bytes(data)
    if sidecar is not None:
        digest = hashlib.new(sidecar, data).hexdigest()
        (root / f"{image_id}.{sidecar}").write_text(f"{digest}  {image_id}\n")


def directory_app(
    settings: Settings, root: Path, *, fill_hooks: FillHooks = NO_HOOKS
) -> web.Application:
    return create_app(settings, upstream=DirectoryUpstream(root), fill_hooks=fill_hooks)


class HeldHooks(FillHooks):
    """Fill hooks that hold one blocking point and note the points on the loop.

    ``hold`` names a blocking point (``deciding``, ``looking_for_remote``,
    ``before_commit``): its first call sets ``entered`` and waits until the test
    sets ``release``; later calls go on at once. ``noted[point]`` is an event
    set whenever the loop point (``joining``, ``joined``, ``watching``) is
    reached; a test waits on it, or clears it to wait for the next time.
    """

    def __init__(self, hold: str = "") -> None:
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        self._calls = itertools.count()  # next() is atomic: one first call across threads
        self.noted: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )

    def _blocking(self, point: str) -> None:
        if point == self.hold and next(self._calls) == 0:
            self.entered.set()
            assert self.release.wait(10), f"the test never released {point}"

    def deciding(self, image_id: str) -> None:
        self._blocking("deciding")

    def looking_for_remote(self, image_id: str) -> None:
        self._blocking("looking_for_remote")

    def before_commit(self, image_id: str) -> None:
        self._blocking("before_commit")

    def joining(self, image_id: str) -> None:
        self.noted["joining"].set()

    def joined(self, flight: Flight) -> None:
        self.noted["joined"].set()

    def watching(self, image_id: str) -> None:
        self.noted["watching"].set()


@contextlib.asynccontextmanager
async def serve_in_process(settings: Settings, root: Path) -> AsyncIterator[GuardedSite]:
    """The service over directory ``root`` (it exists), served here as ``serve`` serves it.

    aiohttp's production defaults, not its test server's (which cancels a
    handler whose client left, where production lets it run on).
    """
    sock = _listen("127.0.0.1", 0)
    runner, site = await start_site(directory_app(settings, root), settings, sock)
    try:
        yield site
    finally:
        await runner.cleanup()


def listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


async def streaming_herd(
    client: TestClient[Any, Any], path: str, count: int
) -> list[asyncio.Task[bytes]]:
    """``count`` downloads of ``path``, returned once every one has its first bytes.

    Each task ends with its whole body; the caller opens the origin's gate.
    """
    started = 0
    everyone_streams = asyncio.Event()

    async def download() -> bytes:
        nonlocal started
        async with client.get(path) as response:
            first = await response.content.readany()
            started += 1
            if started == count:
                everyone_streams.set()
            return first + await response.read()

    tasks = [asyncio.create_task(download()) for _ in range(count)]
    await asyncio.wait_for(everyone_streams.wait(), timeout=10)
    return tasks


async def settled(client: TestClient[Any, Any]) -> None:
    """Wait for the app's verified fills to commit.

    A client has its whole body once the fill is verified, a moment before the
    commit makes it a cache entry; a test that looks at the cache directory (or
    expects a hit) right after a download waits here first.
    """
    await client.app[STATE].fills.settled()


async def filled(client: TestClient[Any, Any], image_id: str, within: float = 20.0) -> None:
    """Wait for the fill of ``image_id`` in the app, if one runs, to end (committed or not).

    For fills no client waits for to the end: one a range started, whose
    client left with its bytes while the fill went on for the cache.
    """
    flight = client.app[STATE].fills.current(image_id)
    if flight is not None and flight.task is not None:
        await asyncio.wait_for(asyncio.shield(flight.task), within)


async def poll(condition: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``within`` seconds.

    Kept for the tests written against it: ``polling.eventually`` with its old
    defaults (20 s, checked every 50 ms).
    """
    await eventually(condition, what, within=within, interval=0.05)


_SERVING = re.compile(r"serving on (http://[0-9.]+:\d+)")


@dataclass
class ServeProcess:
    """A running ``imagecache serve``; its stdout and stderr go to ``log_path``."""

    process: asyncio.subprocess.Process
    cache_dir: Path
    log_path: Path
    url: str = ""

    def log(self) -> str:
        # A file rather than a pipe: what the server logged before it answered a
        # request is readable as soon as the answer is, with no reader task to race.
        return self.log_path.read_text(errors="replace")

    async def stop(self, grace: float = 60.0) -> int:
        """SIGTERM and wait; its exit code (negative if it had to be killed after ``grace`` s)."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), grace)
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()


async def start_serve(
    cache_dir: Path,
    upstream: str,
    *,
    workers: int = 1,
    port: int = 0,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    command: Sequence[str] = (sys.executable, "-c", "from imagecache.cli import main; main()"),
    preexec_fn: Callable[[], None] | None = None,
) -> ServeProcess:
    """``imagecache serve`` on ``port`` (0: a free one); returns once it answers its health check.

    ``env`` is added to this process's environment, ``args`` to the command line;
    ``command`` is the ``imagecache`` to run (default: this checkout's, in this
    interpreter). ``preexec_fn`` runs in the child before it starts (e.g. to
    lower a limit). The log file sits beside ``cache_dir``, one per process (two
    may share a cache).
    """
    log_fd, log_name = tempfile.mkstemp(
        prefix=f"{cache_dir.name}-serve-", suffix=".log", dir=cache_dir.parent
    )
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            "serve",
            "--port",
            str(port),
            "--cache-dir",
            str(cache_dir),
            "--upstream",
            upstream,
            "--workers",
            str(workers),
            *args,
            stdout=log_fd,
            stderr=log_fd,
            env={**os.environ, "IMAGECACHE_LOG_LEVEL": "INFO", **(env or {})},
            preexec_fn=preexec_fn,
        )
    finally:
        os.close(log_fd)  # the child holds its own copy
    server = ServeProcess(process, cache_dir, Path(log_name))
    try:
        await _wait_until_serving(server)
    except BaseException:
        await server.stop(grace=10)  # a failed start leaves no process behind
        raise
    return server


async def _wait_until_serving(server: ServeProcess) -> None:
    def running() -> None:
        assert server.process.returncode is None, "serve exited:\n" + server.log()

    async def announced() -> bool:
        running()
        match = _SERVING.search(server.log())
        if match:
            server.url = match.group(1)
        return match is not None

    await poll(announced, "serve says where it listens", within=30)
    async with aiohttp.ClientSession() as session:

        async def healthy() -> bool:
            running()
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.url + "/healthcheck") as response:
                    return response.status == 200
            return False

        await poll(healthy, f"{server.url} answers its health check", within=30)
