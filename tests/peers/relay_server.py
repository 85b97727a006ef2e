"""The relay's server side, run as a script by ``peers.relay.RelayProcess``.

Standard library only, since it runs as a file outside the test process
(``python tests/peers/relay_server.py --listen H:P --target H:P --control PATH``).
What it does and its control commands: tests/peers/relay.py.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import fcntl
import json
import os
import socket
import struct
import termios
from collections.abc import Sequence
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


async def _delivered(writer: asyncio.StreamWriter, within: float = 5.0) -> None:
    """Wait until the peer has acknowledged every byte written, or ``within`` passes.

    An RST throws away what the sender still holds, so "reset after n bytes"
    waits for them to be acknowledged first (they are the receiver's then).
    """
    sock = writer.get_extra_info("socket")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while sock is not None and loop.time() < deadline:
        with contextlib.suppress(OSError):
            held = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")  # SIOCOUTQ
            if writer.transport.get_write_buffer_size() == 0 and held == b"\0\0\0\0":
                return
        await asyncio.sleep(0.005)


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
        self.origin_bytes = 0  # origin->edge bytes read from the origin: what crossed its link
        self.resets = 0
        self.reset_after: int | None = None
        self.reset_times: int | None = None
        self.rule_generation = 0
        # ``reset_at``: origin->edge byte counts over all connections (in terms of
        # down_planned) at which the connection carrying that byte is cut, in order.
        self.reset_at: list[int] = []
        self.reset_at_base = 0
        # origin->edge bytes decided on (counted before the write, unlike down_bytes),
        # so two connections' chunks in flight at once cannot both miss a threshold.
        self.down_planned = 0

    def stats(self) -> dict[str, Any]:
        names = ("accepted", "up_bytes", "down_bytes", "origin_bytes", "resets", "delay")
        counters = {name: getattr(self, name) for name in (*names, "reset_after", "reset_times")}
        counters["reset_at"] = [total - self.reset_at_base for total in self.reset_at]
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
                if down:
                    self.origin_bytes += len(chunk or b"")
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
                    # Read no more from the origin while the edge acknowledges:
                    # what a cut connection wastes is what was in flight at the
                    # cut (the line, the socket buffers), as on a real link.
                    filler.cancel()
                    await self._forward(writer, chunk[:cut], conn, down)
                    await _delivered(writer)
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
        cut = self._cut_per_connection(conn, size)
        limit = size if cut is None else cut
        if self.reset_at and (left := self.reset_at[0] - self.down_planned) <= limit:
            self.reset_at.pop(0)
            cut = max(left, 0)
        self.down_planned += size if cut is None else cut
        return cut

    def _cut_per_connection(self, conn: Connection, size: int) -> int | None:
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
        elif verb == "reset_at" and args == ["off"]:
            self.reset_at = []
        elif verb == "reset_at" and args:
            totals = [int(arg) for arg in args]
            if totals != sorted(totals) or totals[0] < 0:
                return {"error": f"reset_at needs ascending byte counts, not {args}"}
            self.reset_at_base = self.down_planned
            self.reset_at = [self.reset_at_base + total for total in totals]
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
