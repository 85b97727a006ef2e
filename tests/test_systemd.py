"""The systemd unit in contrib/ and the notification protocol the service speaks to it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagecache.server.notify import Notifier

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
