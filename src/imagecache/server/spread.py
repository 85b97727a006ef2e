"""Spreading connections evenly over the pre-forked workers that share one listening socket.

Every worker waits on the same socket, and the kernel wakes them all for a
new connection; whichever loop runs first accepts it. That is a coin toss
per connection (bench/spread.py: a burst of 4 hits landed 2-2 in 7 of 20
bursts, 3-1 in 11, 4-0 in 2; of 16, 8-8 in 2 of 20 and 12-4 in 5). A worker
is one thread, so with 3-1 one core serves three downloads while the other
serves one and then idles: the burst ends when the crowded worker does.
``SO_REUSEPORT`` would not help: the kernel hashes each connection to a
socket, the same coin toss.

Here each worker publishes how many connections it holds in a page of
memory shared by all workers (``Loads``, made by the parent before it
forks). A worker that holds more than another live worker leaves a waiting
connection to it (``Turn.yields``): it stops watching the socket for
``HANDOFF_DELAY`` seconds. So that a worker never stops serving because its
peers are dead or stuck (a loop blocked, a machine too loaded to schedule
them), the yield ends when that time passes with the connection still
waiting and no peer having accepted anything meanwhile: then the worker
takes it. A dead worker's slot is marked ``DEAD`` by the parent and ignored.
Counts are read and written without a lock: each slot has one writer, and a
stale read costs at most one uneven accept.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

DEAD = 2**62
HANDOFF_DELAY = 0.005
# asyncio's own pause after an accept that failed for lack of resources.
ACCEPT_RETRY_DELAY = 1.0
_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_CELLS = 2  # per slot: connections held, connections accepted (ever)


class Loads:
    """Per-worker connection counts, in anonymous memory shared across ``fork``."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, 8 * _CELLS * workers)
        self._cells = memoryview(self._map).cast("q")
        for slot in range(workers):
            self.mark_dead(slot)

    def mark_dead(self, slot: int) -> None:
        """The slot's worker is gone (or not started): its peers stop yielding to it."""
        self._cells[_CELLS * slot] = DEAD

    def turn(self, slot: int) -> Turn:
        """The view of the worker in ``slot``; it counts from zero connections."""
        self._cells[_CELLS * slot] = 0
        return Turn(self, slot)


class Turn:
    """One worker's side of ``Loads``: its own counts, and whether to leave a connection."""

    def __init__(self, loads: Loads, slot: int) -> None:
        self._cells = loads._cells
        self._mine = _CELLS * slot
        self._others = [_CELLS * s for s in range(loads.workers) if s != slot]

    def held(self, connections: int) -> None:
        self._cells[self._mine] = connections

    def accepted(self) -> None:
        self._cells[self._mine + 1] += 1

    def yields(self) -> bool:
        """Whether another live worker holds fewer connections than this one."""
        mine = self._cells[self._mine]
        return any(self._cells[other] < mine for other in self._others)

    def peers_accepted(self) -> int:
        """Connections the other workers have accepted so far: moves while they take turns."""
        return sum(self._cells[other + 1] for other in self._others)


class Acceptor:
    """Accepts on ``sock`` one connection per wake-up, in turn with the other workers.

    It stands in for asyncio's accept handler (which takes up to a backlog's
    worth per wake-up); ``protocol`` makes each connection's protocol, which
    calls ``release`` when its connection closes. Call in the serving loop.
    """

    def __init__(
        self, sock: socket.socket, turn: Turn, protocol: Callable[[], asyncio.Protocol]
    ) -> None:
        self._sock = sock
        self._turn = turn
        self._protocol = protocol
        self._held = 0  # accepted and not yet closed
        self._paused: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def stop(self) -> None:
        self._unwatch()

    def release(self) -> None:
        self._held -= 1
        self._turn.held(self._held)

    def _readable(self) -> None:
        if self._turn.yields():
            # A less loaded worker is woken by this connection too: let it take it,
            # unless it takes nothing for HANDOFF_DELAY (dead, stuck, unscheduled).
            self._unwatch()
            before = self._turn.peers_accepted()
            self._paused = self._loop.call_later(HANDOFF_DELAY, self._pause_over, before)
            return
        self._accept()

    def _pause_over(self, peers_accepted_before: int) -> None:
        self._paused = None
        if self._turn.peers_accepted() == peers_accepted_before:
            self._accept()  # nobody else took a turn: a waiting connection is ours
        if self._paused is None:  # not paused again by an accept that failed
            self._loop.add_reader(self._sock.fileno(), self._readable)

    def _unwatch(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None

    def _accept(self) -> None:
        """One connection, if one waits; errors as asyncio's accept handler has them."""
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker was quicker, or the client gave up
        except OSError as exc:
            if exc.errno not in _EXHAUSTION:
                raise
            # asyncio's message, which server/connections.py rate-limits.
            self._loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": exc}
            )
            self._unwatch()
            self._paused = self._loop.call_later(ACCEPT_RETRY_DELAY, self._pause_over, -1)
            return
        conn.setblocking(False)
        self._held += 1  # now: the next wake-up decides whose turn it is
        self._turn.held(self._held)
        self._turn.accepted()
        task = self._loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol, conn)
        except OSError as exc:
            # No protocol saw it, so no connection_lost releases it.
            log.info("dropping an accepted connection: %s", exc)
            conn.close()
            self.release()
