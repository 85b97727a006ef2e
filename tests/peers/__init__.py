"""Real peers for the test suite: an HTTP origin, an S3 server, a Glance API.

Each module is a pytest plugin (registered in ``tests/conftest.py``) whose
fixtures start the real thing on a free loopback port and skip loudly when it
cannot run here.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free right now (a subprocess peer will bind it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
