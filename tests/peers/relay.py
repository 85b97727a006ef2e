"""A TCP relay that delays and breaks the traffic between an edge and its origin.

It runs as its own process (``tests/peers/relay_server.py``, started by
``RelayProcess``, standard library only), so its forwarding never shares a
GIL with the edge under test; ``netns=`` starts it inside a namespace.

What it does, per connection and per direction:

- **Delay line.** Each chunk read is stamped with its arrival time and
  written ``delay`` seconds later, while reading goes on meanwhile: the line
  holds up to ``window`` bytes in flight, so a transfer keeps the link's rate
  over a long round trip instead of stopping to wait (``delay`` is one way:
  the round trip is ``2 * delay`` on top of the link's own). The relay ends
  TCP on both sides, so the delay is what the applications see (time to
  first byte, request/answer turns); TCP's own window on each side sees a
  short, local round trip.
- **Resets.** ``reset()`` sends an RST (SO_LINGER 0) on every open connection,
  to both the edge and the origin. ``reset_after(n, times=k)``: a connection
  that forwards ``n`` more origin->edge bytes (headers included, counted from
  the moment of the command or the connection's start, whichever is later)
  gets exactly ``n`` of them, then (once the edge has acknowledged them, or
  after 5 s: an RST discards what its sender holds) an RST; only the next ``k`` such
  connections when ``times`` is given, every one otherwise.
  ``reset_at(n1, n2, ...)``: the same, counted over all connections together:
  the connection that forwards the ``n1``-th origin->edge byte since the
  command (headers included) is cut right after it, then the one that
  forwards the ``n2``-th, and so on. A body resumed on a new connection is
  cut at a point of the whole transfer (half, then three quarters), whatever
  offset the resume started from.
- **Black hole.** ``blackhole()`` stops all forwarding, reading included:
  open connections hang, new ones are accepted by the kernel (the listening
  socket stays) but get no byte and reach no origin. ``restore()`` lets
  everything flow on from where it stopped, as TCP would after a partition.

Control: line commands on a unix socket (the reply is one JSON line of the
counters): ``stats``, ``delay SECONDS``, ``reset``, ``reset_after N [K]``,
``reset_after off``, ``reset_at N1 [N2 ...]``, ``reset_at off``, ``blackhole``,
``restore``, ``quit``. The relay exits
when that connection closes (``quit`` or its controller gone).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

WINDOW = 16 * 1024 * 1024  # bytes in flight per direction; relay_server.py has the same default
SERVER = Path(__file__).resolve().with_name("relay_server.py")


@dataclass
class RelayStats:
    accepted: int
    open: int
    up_bytes: int  # edge->origin bytes forwarded
    down_bytes: int  # origin->edge bytes forwarded
    origin_bytes: int  # origin->edge bytes read from the origin (a cut throws some away)
    resets: int
    delay: float
    blackhole: bool
    reset_after: int | None
    reset_times: int | None
    reset_at: list[int]  # the reset_at thresholds still ahead, as given


class RelayProcess:
    """The relay as a child process, steered over its control socket (a context manager)."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        delay: float = 0.0,
        listen: str = "127.0.0.1",
        window: int = WINDOW,
        netns: str | None = None,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="relay-")
        self.control_path = str(Path(self._dir.name) / "control")
        argv = [sys.executable, str(SERVER), "--listen", f"{listen}:0"]
        argv += ["--target", f"{target[0]}:{target[1]}", "--delay", str(delay)]
        argv += ["--window", str(window), "--control", self.control_path]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.port = self._wait_ready(within=10.0)
        self.url = f"http://{listen}:{self.port}"
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control.settimeout(10.0)
        self._control.connect(self.control_path)
        self._replies = self._control.makefile("r")
        # One command and its reply at a time: a sampling thread (bench/edge.py
        # --timeline) shares the control socket with the caller's commands.
        self._lock = threading.Lock()

    def _wait_ready(self, within: float) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if readable:
                line = self.process.stdout.readline()
                if line.startswith("ready "):
                    return int(line.split()[1])
            if self.process.poll() is not None:
                break
        self.process.kill()  # our own child, by its Popen
        self.process.wait()
        raise RuntimeError(f"relay did not start (exit {self.process.returncode})")

    def _send(self, command: str) -> RelayStats:
        with self._lock:
            self._control.sendall(command.encode() + b"\n")
            reply = json.loads(self._replies.readline())
        if "error" in reply:
            raise ValueError(reply["error"])
        return RelayStats(**reply)

    def stats(self) -> RelayStats:
        return self._send("stats")

    def set_delay(self, seconds: float) -> RelayStats:
        return self._send(f"delay {seconds}")

    def reset(self) -> RelayStats:
        return self._send("reset")

    def reset_after(self, nbytes: int | None, *, times: int | None = None) -> RelayStats:
        if nbytes is None:
            return self._send("reset_after off")
        return self._send(f"reset_after {nbytes}" + ("" if times is None else f" {times}"))

    def reset_at(self, *totals: int) -> RelayStats:
        """Cut the connections carrying these origin->edge bytes of all (none given: off)."""
        return self._send("reset_at " + (" ".join(map(str, totals)) if totals else "off"))

    def blackhole(self) -> RelayStats:
        return self._send("blackhole")

    def restore(self) -> RelayStats:
        return self._send("restore")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._send("quit")
        self._replies.close()
        self._control.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._dir.cleanup()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
