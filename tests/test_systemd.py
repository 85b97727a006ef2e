"""The systemd unit in contrib/ and the notification protocol the service speaks to it."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagecache.server.notify import Notifier
from peers import free_port

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "systemd" / "imagecache.service"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket listening where systemd's NOTIFY_SOCKET would be."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("SKIPPED LOUDLY: systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart= is executable: point it at this checkout's script,
    # as an operator whose console script lives elsewhere would.
    script = Path(sys.executable).with_name("imagecache")
    unit = tmp_path / "imagecache.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/imagecache", str(script)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stderr.strip() == "", result.stderr


def test_the_unit_asks_for_readiness_watchdog_restart_and_a_sandbox() -> None:
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in _settings(UNIT)}
    assert lines["Type"] == "notify"
    assert lines["Restart"] == "on-failure"
    assert "WatchdogSec" in lines
    assert int(lines["LimitNOFILE"]) >= 65536
    assert lines["ProtectSystem"] == "strict"
    assert lines["CacheDirectory"] == "imagecache"
    # The cache directory is the only writable path: nothing else is opened up.
    assert "ReadWritePaths" not in lines


def _settings(unit: Path) -> list[str]:
    return [
        line
        for line in unit.read_text().splitlines()
        if "=" in line and not line.startswith(("#", ";"))
    ]


def test_ready_and_watchdog_arrive_on_the_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert notifier.enabled
    assert notifier.watchdog_interval == pytest.approx(2.0)
    assert notifier.ready("serving on http://127.0.0.1:9393")
    message = sock.recv(4096).decode().splitlines()
    assert "READY=1" in message
    assert f"MAINPID={os.getpid()}" in message
    assert "STATUS=serving on http://127.0.0.1:9393" in message
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_names_are_understood() -> None:
    name = f"imagecache-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(10)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert sock.recv(4096) == b"STOPPING=1"


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x")


def test_a_watchdog_meant_for_another_process_is_ignored() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval is None


def test_a_vanished_socket_is_reported_once_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not notifier.watchdog()
    assert not notifier.watchdog()
    assert len([r for r in caplog.records if "NOTIFY_SOCKET" in r.getMessage()]) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_tells_systemd_it_is_ready_only_once_it_serves_then_pings_the_watchdog(
    tmp_path: Path, notify_socket: tuple[socket.socket, str], workers: int
) -> None:
    sock, path = notify_socket
    origin = tmp_path / "origin"
    origin.mkdir()
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from imagecache.cli import main; main()",
            "serve",
            "--port",
            str(port),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--upstream",
            f"directory:{origin}",
            "--workers",
            str(workers),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
    )
    try:
        ready = sock.recv(4096).decode().splitlines()
        assert "READY=1" in ready, ready
        assert f"MAINPID={process.pid}" in ready
        # READY means serving: the very next request is answered.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/healthcheck")
        assert connection.getresponse().status == 200
        connection.close()
        pings = [sock.recv(4096) for _ in range(3)]  # every 0.2 s (half of WATCHDOG_USEC)
        assert pings == [b"WATCHDOG=1"] * 3
        process.send_signal(signal.SIGTERM)
        said = []
        with contextlib.suppress(TimeoutError):  # read on while it stops, as systemd does
            while b"STOPPING=1" not in said:
                said.append(sock.recv(4096))
        assert b"STOPPING=1" in said
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_a_listener_that_stops_reading_never_blocks_the_sender(
    notify_socket: tuple[socket.socket, str],
) -> None:
    _, path = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    sent = [notifier.watchdog() for _ in range(500)]  # far beyond the queue's length
    assert sent[0]
    assert not all(sent)  # the overflow was dropped, not waited for
