"""The WAN rig itself (tests/peers/wan.py, tests/peers/relay.py): real namespaces, tc, sockets.

Timings here are correctness checks with wide margins (a delay is at least
what was asked, a shaped transfer at least as slow as its rate allows), never
speed measurements; those belong in bench/.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from peers.relay import RelayProcess
from peers.wan import Host, WanRig, leftovers, sweep_stale, unavailable_reason
from polling import eventually_sync

pytestmark = pytest.mark.timeout(60)
ORIGIN_PORT = 8000  # inside the origin's own namespace: nothing else there to clash with
MIB = 1024 * 1024


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def origin(wan_rig: WanRig, tmp_path: Path) -> Iterator[tuple[Host, Path]]:
    """A real ``python -m http.server`` serving ``tmp_path`` inside the origin namespace."""
    host = wan_rig.add_host("o")
    argv = [sys.executable, "-m", "http.server", "--bind", host.address]
    argv += ["--directory", str(tmp_path), str(ORIGIN_PORT)]
    process = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually_sync(
            lambda: _reachable(host.address, ORIGIN_PORT), "http.server in the namespace answers"
        )
        yield host, tmp_path
    finally:
        process.terminate()
        process.wait(timeout=10)


def http_get(port: int, path: str, timeout: float = 30) -> tuple[bytes, BaseException | None]:
    """GET over a raw socket: everything received (headers too) and the error that ended it."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: origin\r\n\r\n".encode())
        try:
            while chunk := sock.recv(256 * 1024):
                received += chunk
        except OSError as exc:
            return bytes(received), exc
    return bytes(received), None


def body(response: bytes) -> bytes:
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:200]
    return rest


def test_origin_in_namespace_is_reached_through_the_relay(origin: tuple[Host, Path]) -> None:
    host, root = origin
    data = os.urandom(300_000)
    (root / "img").write_bytes(data)
    assert host.address.startswith("10.201.")
    assert host.gateway.startswith("10.201.")
    with RelayProcess((host.address, ORIGIN_PORT)) as relay:
        response, error = http_get(relay.port, "/img")
        assert error is None
        assert body(response) == data
        stats = relay.stats()
    assert stats.accepted == 1
    assert stats.down_bytes == len(response)
    assert stats.up_bytes == len(b"GET /img HTTP/1.0\r\nHost: origin\r\n\r\n")


async def test_namespace_sockets_see_only_the_link(wan_rig: WanRig) -> None:
    host = wan_rig.add_host("o")
    echo = _Echo()
    on_link = await echo.start(host.gateway, 0)
    on_loopback = await echo.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    inside = host.make_socket()
    inside.setblocking(False)
    with inside:
        await asyncio.wait_for(loop.sock_connect(inside, on_link.sockets[0].getsockname()), 5)
        assert inside.getsockname()[0] == host.address
    # The namespace has its own loopback: the root namespace's 127.0.0.1 is not there.
    with host.make_socket() as inside:
        inside.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            inside.connect(on_loopback.sockets[0].getsockname())
    await echo.stop()


class _Echo:
    """A line echo server on the test's loop; ``stop`` ends its connections as well.

    ``Server.wait_closed`` does not wait for the handlers (Python 3.11): one
    still running when the loop closes leaves its transport to the garbage
    collector, a ResourceWarning (an error here) in whichever test comes next.
    """

    def __init__(self) -> None:
        self.handlers: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.servers: list[asyncio.Server] = []

    async def start(self, *args: Any, **kwargs: Any) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, *args, **kwargs)
        self.servers.append(server)
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        try:
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        except ConnectionError:
            pass  # the relay's reset, which some tests make on purpose
        finally:
            writer.close()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.monotonic()
    writer.write(b"ping\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
    return time.monotonic() - started


async def test_delay_line_adds_the_configured_round_trip(wan_rig: WanRig) -> None:
    host = wan_rig.add_host("o")
    # The test's own event loop serves the echo, on a socket made inside the namespace.
    listener = host.listen()
    echo = _Echo()
    await echo.start(sock=listener)
    port = listener.getsockname()[1]
    with RelayProcess((host.address, port), delay=0.05) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        trips = [await _round_trip(reader, writer) for _ in range(3)]
        assert all(0.1 <= trip < 0.1 + 0.2 for trip in trips), trips
        relay.set_delay(0.15)  # at run time, for the next bytes of the same connection
        trip = await _round_trip(reader, writer)
        assert 0.3 <= trip < 0.3 + 0.2, trip
        writer.close()
        await writer.wait_closed()
    await echo.stop()


def test_delay_line_streams_instead_of_stopping_to_wait(origin: tuple[Host, Path]) -> None:
    host, root = origin
    (root / "img").write_bytes(os.urandom(2 * MIB))
    with RelayProcess((host.address, ORIGIN_PORT), delay=0.25) as relay:
        started = time.monotonic()
        response, error = http_get(relay.port, "/img")
        elapsed = time.monotonic() - started
    assert error is None
    assert len(body(response)) == 2 * MIB
    # One request and one answer cross the line: about 0.5 s. Holding each of
    # the 32+ chunks for its own 0.25 s turn would take 8 s or more.
    assert 0.5 <= elapsed < 4.0, elapsed


def test_shaped_rate_caps_a_transfer_and_changes_at_run_time(origin: tuple[Host, Path]) -> None:
    host, root = origin
    (root / "big").write_bytes(os.urandom(4 * MIB))
    (root / "small").write_bytes(os.urandom(MIB))
    host.shape(20)
    assert host.qdiscs().count("rate 20Mbit") == 2, host.qdiscs()
    with RelayProcess((host.address, ORIGIN_PORT)) as relay:
        started = time.monotonic()
        response, error = http_get(relay.port, "/big")
        elapsed = time.monotonic() - started
        assert error is None
        assert len(body(response)) == 4 * MIB
        # 4 MiB is 33.5 Mbit: 1.68 s at 20 Mbit/s, less one 64 KiB burst.
        assert elapsed >= 1.4, elapsed
        host.shape(8, up_mbit=1)
        assert "rate 8Mbit" in host.qdiscs()
        assert "rate 1Mbit" in host.qdiscs()
        started = time.monotonic()
        response, error = http_get(relay.port, "/small")
        elapsed = time.monotonic() - started
        assert error is None
        assert len(body(response)) == MIB
        assert elapsed >= 0.9, elapsed  # 8.4 Mbit at 8 Mbit/s: 1.05 s
    host.shape(None)
    assert "tbf" not in host.qdiscs()


def test_reset_after_n_bytes_cuts_the_next_connection_only(origin: tuple[Host, Path]) -> None:
    host, root = origin
    data = os.urandom(MIB)
    (root / "img").write_bytes(data)
    with RelayProcess((host.address, ORIGIN_PORT)) as relay:
        relay.reset_after(300_000, times=1)
        response, error = http_get(relay.port, "/img")
        assert isinstance(error, ConnectionResetError), error
        # The relay sends the RST once the client has acknowledged all 300 000.
        assert len(response) == 300_000
        assert data.startswith(body(response))
        response, error = http_get(relay.port, "/img")  # `times=1`: the next one passes
        assert error is None
        assert body(response) == data
        stats = relay.stats()
    assert stats.resets == 1
    assert stats.reset_times == 0
    assert stats.down_bytes == 300_000 + len(response)


def test_reset_at_counts_bytes_over_all_connections(origin: tuple[Host, Path]) -> None:
    host, root = origin
    data = os.urandom(MIB)
    (root / "img").write_bytes(data)
    with RelayProcess((host.address, ORIGIN_PORT)) as relay:
        relay.reset_at(300_000, 500_000)
        first, error = http_get(relay.port, "/img")
        assert isinstance(error, ConnectionResetError), error
        assert len(first) == 300_000
        # The second connection is cut at the 500 000th byte of both: after 200 000.
        second, error = http_get(relay.port, "/img")
        assert isinstance(error, ConnectionResetError), error
        assert len(second) == 200_000
        assert data.startswith(body(second))
        assert relay.stats().reset_at == []
        third, error = http_get(relay.port, "/img")  # no threshold left: it passes
        assert error is None
        assert body(third) == data
        stats = relay.stats()
    assert stats.resets == 2
    assert stats.down_bytes == 500_000 + len(third)


async def test_reset_and_blackhole_on_command(wan_rig: WanRig) -> None:
    host = wan_rig.add_host("o")
    listener = host.listen()
    echo = _Echo()
    await echo.start(sock=listener)
    with RelayProcess((host.address, listener.getsockname()[1])) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        await _round_trip(reader, writer)
        assert relay.reset().resets == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        writer.close()

        old_r, old_w = await asyncio.open_connection("127.0.0.1", relay.port)
        await _round_trip(old_r, old_w)
        relay.blackhole()
        new_r, new_w = await asyncio.open_connection("127.0.0.1", relay.port)
        answers = []
        for hung_r, hung_w in ((old_r, old_w), (new_r, new_w)):
            hung_w.write(b"hello\n")
            await hung_w.drain()
            answers.append(asyncio.create_task(hung_r.readline()))
        done, _ = await asyncio.wait(answers, timeout=0.5)
        assert not done, "a black-holed connection got an answer"
        stats = relay.stats()
        assert stats.blackhole
        assert stats.accepted == 3
        assert stats.open == 1
        down = stats.down_bytes
        relay.restore()
        assert await asyncio.wait_for(asyncio.gather(*answers), 5) == [b"hello\n"] * 2
        assert relay.stats().down_bytes == down + 2 * len(b"hello\n")
        for hung_w in (old_w, new_w):
            hung_w.close()
            await hung_w.wait_closed()
    await echo.stop()


@pytest.fixture
def rig_possible() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"WAN RIG UNAVAILABLE: {reason}")


@pytest.mark.usefixtures("rig_possible")
def test_teardown_leaves_no_namespace_or_link_even_on_failure() -> None:
    with WanRig() as rig:
        first, second = rig.add_host("a", mbit=10), rig.add_host("b")
        assert first.address != second.address
        assert sorted(leftovers()) == sorted([first.name, first.link, second.name, second.link])
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert first.name in listed
        assert second.name in listed
    assert leftovers() == []

    def fail_inside_a_rig() -> None:
        with WanRig() as rig:
            rig.add_host("c")
            raise RuntimeError("test failure")

    with pytest.raises(RuntimeError, match="test failure"):
        fail_inside_a_rig()
    assert leftovers() == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"ic{os.getpid()}" not in listed


@pytest.mark.usefixtures("rig_possible")
def test_sweep_removes_what_a_dead_run_left() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"ic{dead.pid}o"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(
        ["ip", "link", "add", f"{name}-r", "type", "veth", "peer", "name", f"{name}-x"], check=True
    )
    assert sorted(leftovers(dead.pid)) == [name, f"{name}-r"]
    sweep_stale()
    # Not `name in sweep_stale()`: a concurrent run's rig may sweep them first.
    assert leftovers(dead.pid) == []


def test_relay_runs_inside_a_namespace(wan_rig: WanRig, tmp_path: Path) -> None:
    host = wan_rig.add_host("o")
    (tmp_path / "img").write_bytes(data := os.urandom(100_000))
    # The origin on the namespace's own loopback: only the relay beside it reaches it.
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1"]
    argv += ["--directory", str(tmp_path), str(ORIGIN_PORT)]
    origin = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with RelayProcess(
            ("127.0.0.1", ORIGIN_PORT), listen=host.address, netns=host.name
        ) as relay:
            assert relay.url == f"http://{host.address}:{relay.port}"

            def fetched() -> bool:
                try:
                    with socket.create_connection((host.address, relay.port), timeout=5) as sock:
                        sock.sendall(b"GET /img HTTP/1.0\r\n\r\n")
                        received = b"".join(iter(lambda: sock.recv(65536), b""))
                except ConnectionResetError:
                    return False  # the relay's answer while http.server is not listening yet
                return received.endswith(data)

            eventually_sync(fetched, "the origin answers through the relay in its namespace")
    finally:
        origin.terminate()
        origin.wait(timeout=10)
