"""systemd's notification protocol: readiness, status and the watchdog.

A ``Type=notify`` unit learns that the service is ready (socket bound, cache
open, workers serving) from a ``READY=1`` datagram on the socket named by
``NOTIFY_SOCKET``, and with ``WatchdogSec=`` expects ``WATCHDOG=1`` at least
that often, or it restarts the service. The protocol is a few lines, so it is
written here rather than pulled in as a dependency (python-systemd needs
libsystemd's headers to build). Outside systemd ``NOTIFY_SOCKET`` is unset and
every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends state lines to systemd; silent when not started by it."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; False if it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never wait: a listener that stopped reading (its queue holds
                # net.unix.max_dgram_qlen datagrams) must not stall the service.
                sock.setblocking(False)
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            # Losing a notification must not stop the service; say so once.
            if not self._warned:
                log.warning("cannot notify systemd at NOTIFY_SOCKET: %s", exc.strerror or exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status, mainpid=os.getpid())

    def stopping(self) -> bool:
        return self.send(stopping=1)

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # an abstract socket
    if value.startswith("/"):
        return value
    return None  # unset, or a form (vsock) this service does not speak


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, as sd_watchdog_enabled(3) advises; None if off."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process of the unit
    return int(usec) / 2e6
