"""Run the service: one listening socket, ``settings.workers`` processes serving it.

Pre-fork: the parent binds and listens once, then forks the workers, which
all accept on that same socket. Each worker builds its own ``ImageCache``
(its own sqlite connection) over the shared directory; the fill lock on
``incomplete/<id>`` keeps them to one upstream read per image. Forking before
any event loop or thread exists in the parent keeps the children clean.
Preferred to ``SO_REUSEPORT`` with a bind per worker because the port is
known before any worker starts, including when the settings ask for port 0.

The parent replaces a worker that dies and gives up (exit 1) when they die
too often (server/supervisor.py). SIGTERM or SIGINT to the parent is passed
to every worker. A worker stops accepting, lets running requests and fills
finish (fills for a grace period, then they roll back to ``invalid/``), and
exits. Each worker serves its connections with the header and idle timeouts
and the connection bound of server/connections.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from imagecache.errors import ConfigurationError
from imagecache.server import background, connections, logs
from imagecache.server.app import AccessLogger, create_app, shutdown_grace
from imagecache.server.notify import Notifier
from imagecache.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT; returns when every worker has stopped.

    Raises ``ServiceFailed`` when the workers of a pre-forked service keep dying.
    """
    _configure_logging(settings)
    connections.raise_open_file_limit()  # before forking: the workers inherit it
    sock = _listen(settings.bind_host, settings.bind_port)
    host, port = sock.getsockname()[:2]
    # Each worker logs "serving on" once it accepts (_serve_socket); systemd hears
    # READY=1 only when every first worker does.
    notifier = Notifier()
    status = f"serving on http://{_shown(host)}:{port} with {settings.workers} worker(s)"
    if settings.workers == 1:
        asyncio.run(
            _serve_socket(settings, sock, ready=lambda: notifier.ready(status), notifier=notifier)
        )
        return
    # Private to this service, so that two services sharing a cache directory
    # never mix their numbers (see server/metrics.py).
    metrics_dir = Path(tempfile.mkdtemp(prefix="imagecache-metrics-"))
    # Here, not at the top: multiprocessing, which only the pre-forked parent
    # uses, is a few ms of every single-worker start too.
    from imagecache.server.supervisor import Supervisor

    try:
        # The parent keeps the socket (it never accepts on it) to hand it to
        # the replacements of workers that die (server/supervisor.py).
        Supervisor(settings, sock, metrics_dir, _worker, notifier, status).run()
    finally:
        sock.close()
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


def _worker(
    settings: Settings, sock: socket.socket, metrics_dir: Path, ready: Callable[[], None]
) -> None:
    # The parent's handlers forward signals; a worker handles its own in its loop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which forwards
    try:
        asyncio.run(_serve_socket(settings, sock, metrics_dir, ready=ready))
    except Exception:
        log.exception("worker %d failed", os.getpid())
        sys.exit(1)


async def _serve_socket(
    settings: Settings,
    sock: socket.socket,
    metrics_dir: Path | None = None,
    *,
    ready: Callable[[], object] | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Serve ``sock`` until SIGTERM; ``ready()`` once it accepts, with the cache open.

    ``notifier`` is given when this process is the service's main one (a single
    worker): it pings systemd's watchdog from the loop, so a loop that hangs
    stops the pings and systemd restarts the service.
    """
    app = create_app(settings, metrics_dir=metrics_dir)
    background.defer(app)  # started below, once the socket accepts
    runner, _ = await connections.start_site(
        app,
        settings,
        sock,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("imagecache.access"),
        shutdown_timeout=shutdown_grace(settings),
    )
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
    if ready is not None:
        ready()  # after the handlers: a stop from here on is a clean one
    # Reconciliation, the schedule, the metrics publisher, the heartbeat and the
    # Keystone role check: none of them is needed to serve, so they come after.
    await background.start(app)
    pinger = None
    if notifier is not None and notifier.watchdog_interval is not None:
        pinger = asyncio.create_task(_ping(notifier, notifier.watchdog_interval))
    await stop.wait()
    log.info("worker %d stopping", os.getpid())
    if notifier is not None:
        notifier.stopping()
    if pinger is not None:
        pinger.cancel()
    await runner.cleanup()


async def _ping(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _configure_logging(settings: Settings) -> None:
    # IMAGECACHE_LOG_LEVEL, read here before, is now the setting's own variable.
    logs.configure(settings.log_level, settings.log_format)
