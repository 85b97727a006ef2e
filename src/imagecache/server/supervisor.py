"""The pre-fork parent keeps ``settings.workers`` worker processes alive.

A worker that exits while the service is not stopping (SIGKILL by the OOM
killer, a crash, a failed start) is logged with its pid and exit status and
replaced after a backoff: 0.25 s, doubling with each death in the last
``worker_restart_window`` seconds, at most 10 s. The parent gives up when more
than ``worker_restart_limit`` workers died within that window (workers failing
at every start use it up within seconds): it stops the remaining workers and
raises ``ServiceFailed``, so ``imagecache serve`` exits 1 and a supervisor
(systemd ``Restart=on-failure``) restarts the whole service. Before, a killed
worker was never replaced, and the parent exited 0 when the last one died.

Why these numbers: a worker that dies now and then (5 in a minute) is worth
keeping the service up for, each replacement costs well under a second; one
that cannot start is a fault of the host (a cache directory gone, a database
unreachable) that a restart of the whole unit, with its own backoff and
alerting, handles better than a parent restarting forever.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, Counter, generate_latest

from imagecache.errors import ServiceFailed
from imagecache.server.app import shutdown_grace
from imagecache.server.notify import Notifier
from imagecache.settings import Settings

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.25
MAX_BACKOFF = 10.0

# A worker: serves the socket, and calls its last argument once it accepts.
Target = Callable[[Settings, socket.socket, Path, Callable[[], None]], None]


def _describe(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class Supervisor:
    """Forks, watches and replaces the workers; ``run`` returns when they have stopped."""

    def __init__(
        self,
        settings: Settings,
        sock: socket.socket,
        metrics_dir: Path,
        target: Target,
        notifier: Notifier | None = None,
        status: str = "serving",
    ) -> None:
        self.settings = settings
        self.sock = sock
        self.metrics_dir = metrics_dir
        self.target = target
        self.notifier = notifier if notifier is not None else Notifier({})
        self.status = status
        self.ready_workers = 0
        self._announced = False
        # Workers write one byte here once they accept: systemd hears READY=1
        # when every first worker does, not when they were merely forked.
        self._ready_read, self._ready_write = os.pipe()
        os.set_blocking(self._ready_read, False)
        self.context = multiprocessing.get_context("fork")
        self.workers: dict[int, BaseProcess] = {}  # slot -> its current process
        self.deaths: collections.deque[float] = collections.deque()
        self.stopping = False
        self.restarts = 0
        # The signal handler wakes the wait below through this pipe.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; ``ServiceFailed`` when workers die too often."""
        for slot in range(self.settings.workers):
            self._spawn(slot)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        try:
            self._watch()
        finally:
            self.notifier.stopping()
            for fd in (self._wake_read, self._wake_write, self._ready_read, self._ready_write):
                os.close(fd)

    def _spawn(self, slot: int) -> None:
        worker = self.context.Process(target=self._child, name=f"imagecache-worker-{slot}")
        worker.start()
        self.workers[slot] = worker

    def _child(self) -> None:
        # A replacement is forked with the parent's handlers in place; the
        # worker sets its own, but until then a SIGTERM must not run _stop here.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(self._wake_read)  # the parent's, not the worker's
        os.close(self._wake_write)
        os.close(self._ready_read)
        ready_write = self._ready_write

        def ready() -> None:
            with contextlib.suppress(OSError):  # a parent gone: nothing to tell
                os.write(ready_write, b"r")

        self.target(self.settings, self.sock, self.metrics_dir, ready)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        for worker in self.workers.values():
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        with contextlib.suppress(BlockingIOError):  # already woken
            os.write(self._wake_write, b"x")

    def _watch(self) -> None:
        respawn_at: dict[int, float] = {}  # slot -> when its replacement starts
        while self.workers or (respawn_at and not self.stopping):
            timeout = self.notifier.watchdog_interval
            if respawn_at and not self.stopping:
                until = max(0.0, min(respawn_at.values()) - time.monotonic())
                timeout = until if timeout is None else min(timeout, until)
            sentinels = [w.sentinel for w in self.workers.values()]
            multiprocessing.connection.wait(
                [*sentinels, self._wake_read, self._ready_read], timeout
            )
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 64)  # drained, or the wait would spin
            self._count_ready()
            if self._announced and self.notifier.watchdog_interval is not None:
                self.notifier.watchdog()
            for slot, worker in list(self.workers.items()):
                if worker.is_alive():
                    continue
                worker.join()
                del self.workers[slot]
                if self.stopping:
                    self._log_exit(worker)
                    continue
                respawn_at[slot] = time.monotonic() + self._died(worker)
            if self.stopping:
                respawn_at.clear()
                continue
            now = time.monotonic()
            for slot, when in list(respawn_at.items()):
                if when <= now:
                    del respawn_at[slot]
                    self._spawn(slot)
                    log.info("started %s (pid %d)", self.workers[slot].name, self.workers[slot].pid)

    def _count_ready(self) -> None:
        try:
            self.ready_workers += len(os.read(self._ready_read, 4096))
        except BlockingIOError:
            return
        if not self._announced and self.ready_workers >= self.settings.workers:
            self._announced = True
            self.notifier.ready(self.status)

    def _died(self, worker: BaseProcess) -> float:
        """Count a death; the backoff before its replacement, or ServiceFailed if over budget."""
        now = time.monotonic()
        window = self.settings.worker_restart_window
        self.deaths.append(now)
        while self.deaths and self.deaths[0] < now - window:
            self.deaths.popleft()
        recent = len(self.deaths)
        limit = self.settings.worker_restart_limit
        if recent > limit:
            log.error(
                "%s (pid %d) %s; %d workers died within %g s (worker_restart_limit is %d): "
                "giving up",
                worker.name,
                worker.pid,
                _describe(worker.exitcode),
                recent,
                window,
                limit,
            )
            self._give_up()
            raise ServiceFailed(
                f"{recent} workers died within {window:g} s (worker_restart_limit = {limit}); "
                "see the log for why they exited"
            )
        self.restarts += 1
        self._publish_restarts()
        backoff = min(FIRST_BACKOFF * 2.0 ** (recent - 1), MAX_BACKOFF)
        log.error(
            "%s (pid %d) %s; starting a replacement in %.2f s",
            worker.name,
            worker.pid,
            _describe(worker.exitcode),
            backoff,
        )
        return backoff

    def _publish_restarts(self) -> None:
        """Put the restart count beside the workers' numbers, so /metrics shows it.

        The parent serves no requests; it writes an exposition file of its own
        into the workers' shared directory (server/metrics.py merges every live
        process's file into a scrape).
        """
        registry = CollectorRegistry(auto_describe=True)
        counter = Counter(
            "imagecache_worker_restarts",
            "Worker processes that died and were replaced",
            registry=registry,
        )
        counter.inc(self.restarts)
        partial = self.metrics_dir / f".{os.getpid()}.partial"
        try:
            partial.write_bytes(generate_latest(registry))
            os.replace(partial, self.metrics_dir / f"{os.getpid()}.prom")
        except OSError as exc:
            log.warning("cannot publish the worker restart count: %s", exc)

    def _give_up(self) -> None:
        self.stopping = True
        for worker in self.workers.values():
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        for worker in self.workers.values():
            # Running downloads get the usual grace, then the worker is killed.
            worker.join(shutdown_grace(self.settings) + 5)
            if worker.is_alive():
                worker.kill()
                worker.join()
            self._log_exit(worker)
        self.workers.clear()

    @staticmethod
    def _log_exit(worker: BaseProcess) -> None:
        if worker.exitcode:
            log.error("%s (pid %d) %s", worker.name, worker.pid, _describe(worker.exitcode))
