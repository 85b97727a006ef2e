"""Run the service: one listening socket, ``settings.workers`` processes serving it.

Pre-fork: the parent binds and listens once, then forks the workers, which
all accept on that same socket. Each worker builds its own ``ImageCache``
(its own sqlite connection) over the shared directory; the fill lock on
``incomplete/<id>`` keeps them to one upstream read per image. Forking before
any event loop or thread exists in the parent keeps the children clean.
Preferred to ``SO_REUSEPORT`` with a bind per worker because the port is
known before any worker starts, including when the settings ask for port 0.

SIGTERM or SIGINT to the parent is passed to every worker. A worker stops
accepting, lets running requests and fills finish (fills for a grace period,
then they roll back to ``invalid/``), and exits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType

from aiohttp import web

from imagecache.errors import ConfigurationError
from imagecache.logsafe import EscapingFilter
from imagecache.server.app import AccessLogger, create_app, shutdown_grace
from imagecache.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; returns when every worker has stopped."""
    _configure_logging()
    sock = _listen(settings.bind_host, settings.bind_port)
    if settings.workers == 1:
        asyncio.run(_serve_socket(settings, sock))
        return
    # Private to this service, so that two services sharing a cache directory
    # never mix their numbers (see server/metrics.py).
    metrics_dir = Path(tempfile.mkdtemp(prefix="imagecache-metrics-"))
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(
            target=_worker, args=(settings, sock, metrics_dir), name=f"imagecache-worker-{n}"
        )
        for n in range(settings.workers)
    ]
    for worker in workers:
        worker.start()
    sock.close()  # the workers hold it now

    def forward(signum: int, frame: FrameType | None) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        for worker in workers:
            worker.join()
            if worker.exitcode:
                log.error("%s exited with code %s", worker.name, worker.exitcode)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        # The bare "[Errno 98] Address already in use" names no address.
        raise ConfigurationError(
            f"bind_host/bind_port: cannot listen on {_shown(host)}:{port}: {exc.strerror or exc}"
        ) from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _worker(settings: Settings, sock: socket.socket, metrics_dir: Path) -> None:
    # The parent's handlers forward signals; a worker handles its own in its loop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which forwards
    try:
        asyncio.run(_serve_socket(settings, sock, metrics_dir))
    except Exception:
        log.exception("worker %d failed", os.getpid())
        sys.exit(1)


async def _serve_socket(
    settings: Settings, sock: socket.socket, metrics_dir: Path | None = None
) -> None:
    app = create_app(settings, metrics_dir=metrics_dir)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("imagecache.access"),
        shutdown_timeout=shutdown_grace(settings),
    )
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    # Only now: a start that fails (database missing, node URL taken) must not
    # have said "serving" first.
    host, port = sock.getsockname()[:2]
    log.info(
        "imagecache serving on http://%s:%d with %d worker(s), upstream %s, cache %s (pid %d)",
        _shown(host),
        port,
        settings.workers,
        settings.upstream,
        settings.image_cache_dir,
        os.getpid(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("worker %d stopping", os.getpid())
    await runner.cleanup()


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("IMAGECACHE_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    for handler in logging.getLogger().handlers:
        # Request paths, ids and origin messages reach these lines: escaped, they
        # cannot forge one (logsafe).
        handler.addFilter(EscapingFilter())
