"""A service process serves first: background work starts after its socket accepts (background.py).

What the first request does not need is neither imported nor started before
the socket accepts: SQLAlchemy and alembic for a cache without the central
driver, keystoneauth1 without a ``[keystone]`` table, reconciliation and the
scheduled jobs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import aiohttp

from imagecache.server import run
from imagecache.server.run import _listen
from imagecache.settings import Settings
from polling import eventually

_MAINTENANCE_THREAD = "imagecache-maintenance"


def _maintenance_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(_MAINTENANCE_THREAD)]


async def test_serving_starts_before_reconciliation_and_the_scheduled_jobs(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    origin = tmp_path / "origin"
    origin.mkdir()
    settings = make_settings(upstream=f"directory:{origin}")
    sock = _listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    at_ready: list[str] = []
    answered: list[int] = []
    failures: list[BaseException] = []
    loop = asyncio.get_running_loop()

    async def then_stop() -> None:
        try:
            # Serving already: a request is answered ...
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{port}/healthcheck") as response,
            ):
                answered.append(response.status)
            # ... and the reconciliation's thread comes after.
            await eventually(_maintenance_threads, "the maintenance has started", within=20)
        except BaseException as exc:
            failures.append(exc)
        finally:
            # Handled by _serve_socket's own handler: a clean stop.
            signal.raise_signal(signal.SIGTERM)

    tasks: list[asyncio.Task[None]] = []

    def ready() -> None:
        at_ready.extend(_maintenance_threads())
        tasks.append(loop.create_task(then_stop()))

    assert not _maintenance_threads()  # another test's would spoil the evidence
    try:
        await asyncio.wait_for(run._serve_socket(settings, sock, ready=ready), 60)
    finally:
        sock.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    await asyncio.gather(*tasks)
    assert not failures, failures
    assert answered == [200]
    # When the socket started accepting, no reconciliation had been started yet.
    assert at_ready == []


def test_a_sqlite_service_imports_neither_sqlalchemy_nor_keystoneauth1(tmp_path: Path) -> None:
    # A new interpreter: this one has imported everything the suite needs.
    origin = tmp_path / "origin"
    origin.mkdir()
    script = (
        "import sys\n"
        "from imagecache.settings import load_settings\n"
        "from imagecache.server.app import create_app\n"
        f"settings = load_settings(None, image_cache_dir={str(tmp_path / 'cache')!r},"
        f" upstream={'directory:' + str(origin)!r})\n"
        "create_app(settings)\n"
        "names = ('sqlalchemy', 'alembic', 'psycopg', 'keystoneauth1', 'requests')\n"
        "print(' '.join(name for name in names if name in sys.modules))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("IMAGECACHE_")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported without need: {result.stdout.strip()}"
