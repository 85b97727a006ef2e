"""A TCP relay that delays and breaks the traffic between an edge and its origin.

It runs as its own process (``python tests/peers/relay.py``, started by
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
  gets exactly ``n`` of them, then an RST; only the next ``k`` such
  connections when ``times`` is given, every one otherwise.
- **Black hole.** ``blackhole()`` stops all forwarding, reading included:
  open connections hang, new ones are accepted by the kernel (the listening
  socket stays) but get no byte and reach no origin. ``restore()`` lets
  everything flow on from where it stopped, as TCP would after a partition.

Control: line commands on a unix socket (the reply is one JSON line of the
counters): ``stats``, ``delay SECONDS``, ``reset``, ``reset_after N [K]``,
``reset_after off``, ``blackhole``, ``restore``, ``quit``. The relay exits
when that connection closes (``quit`` or its controller gone).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024
WINDOW = 16 * 1024 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            # Linger 0 turns close() into an RST instead of a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Connection:
    def __init__(self, edge: asyncio.StreamWriter, origin: asyncio.StreamWriter) -> None:
        self.edge, self.origin = edge, origin
        self.down = 0  # origin->edge bytes forwarded
        self.rule_generation, self.rule_base = -1, 0  # reset_after counts from rule_base
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.edge, self.origin):
            _reset(writer)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()


class Relay:
    def __init__(self, target: tuple[str, int], delay: float, window: int) -> None:
        self.target = target
        self.delay = delay
        self.window = window
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connections: set[Connection] = set()
        self.accepted = 0
        self.up_bytes = 0
        self.down_bytes = 0
        self.resets = 0
        self.reset_after: int | None = None
        self.reset_times: int | None = None
        self.rule_generation = 0

    def stats(self) -> dict[str, Any]:
        names = ("accepted", "up_bytes", "down_bytes", "resets", "delay", "reset_after")
        counters = {name: getattr(self, name) for name in (*names, "reset_times")}
        return {**counters, "open": len(self.connections), "blackhole": not self.flowing.is_set()}

    async def serve(self, edge_r: asyncio.StreamReader, edge_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            await self._serve(edge_r, edge_w)
        except asyncio.CancelledError:
            # Only at shutdown. Python 3.11's start_server logs a handler that
            # ends cancelled as an error, so end it as a reset instead.
            _reset(edge_w)

    async def _serve(self, edge_r: asyncio.StreamReader, edge_w: asyncio.StreamWriter) -> None:
        await self.flowing.wait()  # a black hole answers nothing, the origin included
        try:
            origin_r, origin_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(edge_w)
            return
        conn = Connection(edge_w, origin_w)
        self.connections.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pipe(edge_r, origin_w, conn, down=False)),
            asyncio.create_task(self._pipe(origin_r, edge_w, conn, down=True)),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self.connections.discard(conn)
            edge_w.close()
            origin_w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        *,
        down: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        # (release time, chunk); b"" is the end of the stream, None a reset from the sender.
        line: collections.deque[tuple[float, bytes | None]] = collections.deque()
        queued = asyncio.Event()
        room = asyncio.Event()
        held = 0

        async def fill() -> None:
            nonlocal held
            while True:
                await self.flowing.wait()
                while held >= self.window:
                    room.clear()
                    await room.wait()
                chunk: bytes | None
                try:
                    chunk = await reader.read(CHUNK)
                except OSError:
                    chunk = None
                line.append((loop.time() + self.delay, chunk))
                held += len(chunk or b"")
                queued.set()
                if not chunk:
                    return

        filler = asyncio.create_task(fill())
        try:
            while True:
                while not line:
                    queued.clear()
                    await queued.wait()
                release, chunk = line[0]
                if (wait := release - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self.flowing.wait()
                line.popleft()
                if chunk is None:
                    self.resets += 1
                    conn.reset()
                    return
                if not chunk:
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                    return
                held -= len(chunk)
                room.set()
                if down and (cut := self._cut(conn, len(chunk))) is not None:
                    await self._forward(writer, chunk[:cut], conn, down)
                    self.resets += 1
                    conn.reset()
                    return
                await self._forward(writer, chunk, conn, down)
        except OSError:
            conn.reset()
        finally:
            filler.cancel()
            with contextlib.suppress(BaseException):
                await filler

    async def _forward(
        self, writer: asyncio.StreamWriter, chunk: bytes, conn: Connection, down: bool
    ) -> None:
        writer.write(chunk)
        await writer.drain()
        if down:
            self.down_bytes += len(chunk)
            conn.down += len(chunk)
        else:
            self.up_bytes += len(chunk)

    def _cut(self, conn: Connection, size: int) -> int | None:
        """How many bytes of the next ``size`` to send before a reset, or None: send them all."""
        if self.reset_after is None or self.reset_times == 0:
            return None
        if conn.rule_generation != self.rule_generation:
            conn.rule_generation = self.rule_generation
            conn.rule_base = conn.down
        sent = conn.down - conn.rule_base
        if sent + size < self.reset_after:
            return None
        if self.reset_times is not None:
            self.reset_times -= 1
        return self.reset_after - sent

    def command(self, words: list[str]) -> dict[str, Any]:
        verb, args = (words[0], words[1:]) if words else ("", [])
        if verb == "delay" and len(args) == 1:
            self.delay = float(args[0])
        elif verb == "reset" and not args:
            for conn in list(self.connections):
                self.resets += 1
                conn.reset()
        elif verb == "reset_after" and args == ["off"]:
            self.reset_after, self.reset_times = None, None
        elif verb == "reset_after" and len(args) in (1, 2):
            self.reset_after = int(args[0])
            self.reset_times = int(args[1]) if len(args) == 2 else None
            self.rule_generation += 1
        elif verb == "blackhole" and not args:
            self.flowing.clear()
        elif verb == "restore" and not args:
            self.flowing.set()
        elif verb not in ("stats", "quit") or args:
            return {"error": f"unknown command {' '.join(words)!r}"}
        return self.stats()


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    relay = Relay((host, int(port)), args.delay, args.window)
    listen_host, _, listen_port = args.listen.rpartition(":")
    server = await asyncio.start_server(relay.serve, listen_host, int(listen_port))
    done = asyncio.Event()

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                words = line.decode().split()
                try:
                    reply = relay.command(words)
                except ValueError as exc:
                    reply = {"error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
                if words == ["quit"]:
                    break
        # The relay lives as long as its controller's connection: a test process
        # that dies leaves no relay behind. No await after this, so the handler
        # ends before _main does.
        done.set()
        writer.close()

    controller = await asyncio.start_unix_server(control, args.control)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await done.wait()
    server.close()
    controller.close()
    for conn in list(relay.connections):
        conn.reset()


@dataclass
class RelayStats:
    accepted: int
    open: int
    up_bytes: int  # edge->origin bytes forwarded
    down_bytes: int  # origin->edge bytes forwarded
    resets: int
    delay: float
    blackhole: bool
    reset_after: int | None
    reset_times: int | None


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
        argv = [sys.executable, str(Path(__file__).resolve()), "--listen", f"{listen}:0"]
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT of the origin")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay, seconds")
    parser.add_argument("--window", type=int, default=WINDOW, help="bytes in flight per direction")
    parser.add_argument("--control", required=True, help="unix socket path for commands")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.control)


if __name__ == "__main__":
    main()
