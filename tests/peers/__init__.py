"""Real peers for the test suite: an HTTP origin, an S3 server, a Glance API.

Each module is a pytest plugin (registered in ``tests/conftest.py``) whose
fixtures start the real thing on a free loopback port and skip loudly when it
cannot run here.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest


def free_port() -> int:
    """A loopback port free right now (a subprocess peer will bind it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_script(
    script: Path, command: str, env: dict[str, str], timeout: float, args: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """One subcommand of a ``shared/peers/*.sh`` script, its output captured."""
    return subprocess.run(
        [str(script), command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def install_or_skip(script: Path, label: str, env: dict[str, str], timeout: float = 900) -> None:
    """``script install`` (a no-op once done), or skip loudly saying why it cannot run here."""
    if not script.is_file():
        pytest.skip(f"{label} UNAVAILABLE: {script} not found (shared/ beside the checkout)")
    installed = run_script(script, "install", env, timeout)
    if installed.returncode != 0:
        pytest.skip(
            f"{label} UNAVAILABLE: `{script.name} install` failed (no PyPI?): "
            + installed.stderr[-800:]
        )
