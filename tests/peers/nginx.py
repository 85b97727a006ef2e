"""A real nginx serving a directory inside a WAN rig host, with an access log to count by.

An origin that neither knows nor cares about imagecache: what it logs is
what the edge really asked of it (every ``HEAD``, sidecar ``GET`` and body
``GET``), so a test counts origin reads from its access log rather than
from hooks of our own. Debian's ``nginx-light`` is enough (core http only).

API::

    origin = start_nginx(host, root, log_dir)   # nginx in host's namespace, serving root
    origin.url                                  # "http://10.201.x.2:8080"
    origin.requests()                           # [LoggedRequest(method, path, status,
                                                #                body_bytes, range, if_range)]
    origin.wait_for(lambda reqs: ..., within=10, what="...")
    origin.stop()

Skips loudly (``NGINX UNAVAILABLE``) where there is no ``nginx`` binary.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.wan import Host

PORT = 8080  # inside the host's own namespace: nothing else there to clash with

# One line per request, written when the request ends (also when the client
# broke it off): method, path, status, body bytes sent, and the request's
# Range and If-Range headers ("-" when absent). Tab-separated: an If-Range
# date has spaces, and nginx escapes control characters in logged values
# (\xXX), so a tab inside a field cannot be mistaken for a separator.
_CONFIG = """\
worker_processes 1;
daemon off;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    log_format origin '$request_method\t$uri\t$status\t$body_bytes_sent'
                      '\t$http_range\t$http_if_range';
    access_log {prefix}/access.log origin;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen {address}:{port};
        root {root};
    }}
}}
"""


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    body_bytes: int
    range: str | None = None  # the Range header asked, if any
    if_range: str | None = None  # the If-Range header sent, if any


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str
    prefix: Path

    def requests(self) -> list[LoggedRequest]:
        log = self.prefix / "access.log"
        lines = log.read_text().splitlines() if log.exists() else []
        found = []
        for line in lines:
            method, path, status, sent, asked, if_range = line.split("\t")
            found.append(
                LoggedRequest(
                    method, path, int(status), int(sent), _header(asked), _header(if_range)
                )
            )
        return found

    def wait_for(
        self, condition: Callable[[list[LoggedRequest]], bool], within: float, what: str
    ) -> list[LoggedRequest]:
        """Poll the access log until ``condition`` holds on it; its requests then."""
        deadline = time.monotonic() + within
        while True:
            logged = self.requests()
            if condition(logged):
                return logged
            if time.monotonic() > deadline:
                raise AssertionError(f"nginx access log: timed out waiting for {what}: {logged}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.process.terminate()  # our own child, by its Popen
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _header(logged: str) -> str | None:
    """A header as nginx logged it: "-" is absent; quotes come escaped (\\x22)."""
    return None if logged == "-" else logged.replace("\\x22", '"')


def _answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_nginx(host: Host, root: Path, prefix: Path) -> Nginx:
    """nginx in ``host``'s namespace serving ``root`` on port 8080; its logs in ``prefix``."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.skip("NGINX UNAVAILABLE: no `nginx` binary (apt-get install nginx-light)")
    prefix.mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(_CONFIG.format(prefix=prefix, address=host.address, port=PORT, root=root))
    argv = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)]
    process = host.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    origin = Nginx(process, f"http://{host.address}:{PORT}", prefix)
    deadline = time.monotonic() + 10
    while not _answers(host.address, PORT):
        if process.poll() is not None or time.monotonic() > deadline:
            origin.stop()
            errors = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
            raise AssertionError(f"nginx did not start in {host.name}: {errors[-1500:]}")
        time.sleep(0.02)
    # The probe connection carried no request, so nothing is logged for it.
    return origin
