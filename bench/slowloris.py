"""A bounded slowloris client for the load run: N loopback connections that never finish a header.

Each connection sends ``GET / HTTP/1.1`` and then one header byte every
``interval`` seconds, never the blank line that ends the header. When the
server closes one (its header timeout), it is opened again, so about N are
held at any moment. Loopback only, at most ``MAX_CONNECTIONS`` connections, at
most ``MAX_DURATION`` seconds: a tool to check our own service, not to attack one.

    .venv/bin/python bench/slowloris.py --port 9393 --connections 300 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

MAX_CONNECTIONS = 2000
MAX_DURATION = 600.0


@dataclass
class SlowStats:
    """What the slow connections saw."""

    opened: int = 0
    closed_by_server: int = 0
    refused: int = 0  # connect failed, or the server answered (a 503 beyond its bound)
    lifetimes: list[float] = field(default_factory=list)
    held_now: int = 0
    held_min_after_ramp: int | None = None

    def summary(self) -> dict[str, float | int | None]:
        lifetimes = sorted(self.lifetimes)
        median = lifetimes[len(lifetimes) // 2] if lifetimes else None
        return {
            "opened": self.opened,
            "closed_by_server": self.closed_by_server,
            "refused": self.refused,
            "median_lifetime_s": round(median, 2) if median is not None else None,
            "held_min_after_ramp": self.held_min_after_ramp,
        }


def _check_loopback(host: str) -> None:
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise SystemExit(f"slowloris only targets loopback; {host} is {address}")


async def _one(host: str, port: int, interval: float, until: float, stats: SlowStats) -> None:
    """Hold one slow connection, reopened whenever the server closes it, until ``until``."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats.refused += 1
            await asyncio.sleep(interval)
            continue
        stats.opened += 1
        stats.held_now += 1
        opened = time.monotonic()
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
            answered = asyncio.ensure_future(reader.read(1))
            while time.monotonic() < until:
                done, _ = await asyncio.wait({answered}, timeout=interval)
                if done:
                    if answered.result():
                        stats.refused += 1  # an answer before a complete header: a refusal
                    else:
                        stats.closed_by_server += 1
                        stats.lifetimes.append(time.monotonic() - opened)
                    break
                writer.write(b"X")  # one more byte of a header line that never ends
                await writer.drain()
            answered.cancel()
        except OSError:
            stats.closed_by_server += 1
            stats.lifetimes.append(time.monotonic() - opened)
        finally:
            stats.held_now -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def run(
    host: str, port: int, connections: int, interval: float, duration: float
) -> SlowStats:
    """Hold ``connections`` slow connections to ``host:port`` for ``duration`` seconds."""
    _check_loopback(host)
    connections = min(connections, MAX_CONNECTIONS)
    duration = min(duration, MAX_DURATION)
    stats = SlowStats()
    until = time.monotonic() + duration
    tasks = [
        asyncio.create_task(_one(host, port, interval, until, stats)) for _ in range(connections)
    ]
    ramp_end = time.monotonic() + 2 * interval
    while not all(task.done() for task in tasks) and time.monotonic() < until:
        await asyncio.sleep(0.5)
        if time.monotonic() > ramp_end:
            low = stats.held_min_after_ramp
            stats.held_min_after_ramp = stats.held_now if low is None else min(low, stats.held_now)
    await asyncio.gather(*tasks)
    return stats


def in_thread(
    host: str, port: int, connections: int, interval: float, duration: float
) -> tuple[threading.Thread, list[SlowStats]]:
    """``run`` in a thread of its own (beside a blocking load generator); stats land in the list."""
    out: list[SlowStats] = []

    def target() -> None:
        out.append(asyncio.run(run(host, port, connections, interval, duration)))

    thread = threading.Thread(target=target, name="slowloris", daemon=True)
    thread.start()
    return thread, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between bytes")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    args = parser.parse_args(argv)
    stats = asyncio.run(run(args.host, args.port, args.connections, args.interval, args.duration))
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
