"""A WAN rig: network namespaces joined by shaped veth links, plus a delay relay.

Topology (one "host" per ``WanRig.add_host``)::

    root namespace                                   namespace ic<pid><label>
    ------------------------------------             ------------------------
    edge (imagecache, a test client)
      |  loopback, unshaped
    relay (peers.relay, a subprocess:                origin (http.server,
      delay line, resets, black hole)                  aiohttp, the test's
      |                                                own asyncio server)
    ic<pid><label>-r 10.201.x.1/30 ===== veth ===== ic<pid><label>-n 10.201.x.2/30
      egress TBF: edge->origin rate                   egress TBF: origin->edge rate

The origin lives in its own namespace, so the only way to it is the veth,
where ``tc`` TBF shapes each direction on that direction's egress (no netem
here, so delay and faults come from the relay, which sits in the root
namespace on loopback in front of the link). The edge stays in the root
namespace: it needs PostgreSQL and the other loopback peers, which a
namespace would cut off.

Names carry the pid (``ic<pid><label>``) so two test runs never clash, and a
sweep removes namespaces and links left by dead pids (a run killed before
its teardown). Subnets are /30s out of 10.201.0.0/16, picked under a lock
among those no root-namespace link uses yet.

API::

    with WanRig() as rig:                      # or the ``wan_rig`` fixture
        origin = rig.add_host("o", mbit=20)    # namespace, veth, addresses, shaping
        origin.address                         # "10.201.x.2": the origin's side
        proc = origin.popen([sys.executable, "-m", "http.server", "--bind", origin.address, "8000"])
        sock = origin.listen()                 # a listening socket inside the namespace:
        await asyncio.start_server(handler, sock=sock)   # the test's own loop serves it
        origin.shape(50, up_mbit=5)            # change the rates at run time (None: unshaped)
        origin.cut(); origin.mend()            # a partition: both ends drop every packet, silently
        with RelayProcess((origin.address, 8000), delay=0.02) as relay:   # peers.relay
            relay.url                          # "http://127.0.0.1:PORT": point the edge here
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

PREFIX = "ic"
NETWORK = ipaddress.IPv4Network("10.201.0.0/16")
LOCK_PATH = ("/run/lock" if os.path.isdir("/run/lock") else "/tmp") + "/imagecache-wan.lock"
CLONE_NEWNET = 0x40000000
_NAMESPACE = re.compile(rf"^{PREFIX}(\d+)[a-z]{{1,3}}$")
_LINK = re.compile(rf"^{PREFIX}(\d+)[a-z]{{1,3}}-[rn]$")
_LABEL = re.compile(r"^[a-z]{1,3}$")
T = TypeVar("T")


class WanUnavailable(RuntimeError):
    """Namespaces, veth or tc cannot be used here (the message says which command failed)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise WanUnavailable(f"`{' '.join(argv)}` failed: {done.stderr.strip()[-400:]}")
    return done


def unavailable_reason() -> str | None:
    """Why the rig cannot run here, or None (this also makes and drops a probe namespace)."""
    if os.geteuid() != 0:
        return "not root (network namespaces need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH"
    probe = f"{PREFIX}{os.getpid()}zzz"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "del", probe)
    except WanUnavailable as exc:
        return str(exc)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete rig namespaces and root-side links whose pid is dead; return their names."""
    removed: list[str] = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split(" ", 1)[0]
        found = _NAMESPACE.match(name)
        stale = found is not None and not _alive(int(found.group(1)))
        if stale and _run("ip", "netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    for line in _run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(": ", 2)
        name = parts[1].split("@", 1)[0] if len(parts) > 1 else ""
        found = _LINK.match(name)
        stale = found is not None and not _alive(int(found.group(1)))
        if stale and _run("ip", "link", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def in_netns(namespace: str, call: Callable[[], T]) -> T:
    """Run ``call`` in a fresh thread that has entered ``namespace``; return its result.

    Only that short-lived thread changes namespace (setns is per thread), so
    the caller's threads and event loop never leave the root namespace. A
    socket made there stays in the namespace for life, wherever it is used.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _setns(f"/run/netns/{namespace}")
            result.append(call())
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{namespace}")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _tc_rate(device: str, mbit: float | None, namespace: str | None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    if mbit is None:
        _run(*prefix, "tc", "qdisc", "del", "dev", device, "root", check=False)
        return
    rate_bytes = mbit * 1_000_000 / 8
    # Burst: 10 ms of the rate but at least 64 KiB, since veth hands TBF GSO
    # packets of up to 64 KiB. Limit: 100 ms of queue, so TCP sees a queue
    # (and a few drops) rather than a wall.
    burst = max(int(rate_bytes / 100), 64 * 1024)
    limit = max(int(rate_bytes / 10), 4 * burst)
    _run(
        *prefix,
        "tc",
        "qdisc",
        "replace",
        "dev",
        device,
        "root",
        "tbf",
        "rate",
        f"{int(mbit * 1000)}kbit",
        "burst",
        str(burst),
        "limit",
        str(limit),
    )


@dataclass
class Host:
    """One namespace at the end of its veth link from the root namespace."""

    name: str  # the namespace
    link: str  # the root-side veth end
    peer: str  # the namespace-side veth end
    address: str  # the namespace side's address
    gateway: str  # the root side's address
    rates: tuple[float | None, float | None] = (None, None)  # (down, up) as last shaped

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (the caller stops it, by this Popen)."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("timeout", 30)
        return subprocess.run(self.command(argv), check=False, **kwargs)

    def make_socket(
        self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A fresh socket inside the namespace (connect it to reach others from there)."""
        return in_netns(self.name, lambda: socket.socket(family, kind))

    def listen(self, port: int = 0, backlog: int = 128) -> socket.socket:
        """A non-blocking socket listening on ``address:port`` inside the namespace.

        Hand it to ``asyncio.start_server(sock=...)`` or aiohttp's ``SockSite``
        to serve from the caller's own event loop.
        """

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.address, port))
            sock.listen(backlog)
            sock.setblocking(False)
            return sock

        return in_netns(self.name, make)

    def shape(self, mbit: float | None, *, up_mbit: float | None = None) -> None:
        """Shape origin->edge to ``mbit`` and edge->origin to ``up_mbit`` (default: the same).

        ``None`` for ``mbit`` removes the shaping in both directions.
        Works at run time: ``tc qdisc replace`` keeps the link and its connections.
        """
        up = mbit if up_mbit is None else up_mbit
        self.rates = (mbit, up)
        _tc_rate(self.peer, mbit, self.name)  # leaves the namespace: towards the edge
        _tc_rate(self.link, up, None)  # leaves the root namespace: towards the origin

    def cut(self) -> None:
        """Partition the link: each end's egress becomes a ``blackhole`` qdisc.

        Every packet is dropped in both directions and the sender is told it
        left (no error, no ICMP, no RST): TCP retransmits into the void, as
        over a dead WAN link. The links stay up, so addresses and routes stay.
        """
        _run("ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", self.peer,
             "root", "blackhole")  # fmt: skip
        _run("tc", "qdisc", "replace", "dev", self.link, "root", "blackhole")

    def mend(self) -> None:
        """Undo ``cut``: the shaping of before (or none); open connections go on."""
        down, up = self.rates
        _tc_rate(self.peer, down, self.name)  # None: the qdisc deleted, the default back
        _tc_rate(self.link, up, None)

    def qdiscs(self) -> str:
        """``tc qdisc show`` of both ends, for checks and failure messages."""
        inner = self.run(["tc", "qdisc", "show", "dev", self.peer], capture_output=True, text=True)
        outer = _run("tc", "qdisc", "show", "dev", self.link, check=False)
        return f"{self.peer}: {inner.stdout.strip()}\n{self.link}: {outer.stdout.strip()}"


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    # Two runs picking a free subnet at the same moment must not pick the same one.
    with open(LOCK_PATH, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    used: set[ipaddress.IPv4Network] = set()
    for line in _run("ip", "-o", "-4", "addr", "show", check=False).stdout.splitlines():
        for word in line.split():
            if "/" in word and word[0].isdigit():
                with contextlib.suppress(ValueError):
                    used.add(ipaddress.IPv4Interface(word).network)
    return used


class WanRig:
    """Namespaced hosts of this process; ``close`` (or leaving ``with``) removes them all."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.hosts: list[Host] = []

    def __enter__(self) -> WanRig:
        sweep_stale()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_host(self, label: str = "o", *, mbit: float | None = None) -> Host:
        """A namespace ``ic<pid><label>`` linked to the root namespace by a fresh veth pair."""
        if not _LABEL.match(label) or label == "zzz":
            raise ValueError(f"label must be 1-3 lowercase letters (not 'zzz'), got {label!r}")
        name = f"{PREFIX}{self.pid}{label}"
        if any(host.name == name for host in self.hosts):
            raise ValueError(f"host {label!r} already exists in this rig")
        with _allocation_lock():
            subnet = self._free_subnet()
            gateway, address = (str(ip) for ip in subnet.hosts())
            host = Host(name, f"{name}-r", f"{name}-n", address, gateway)
            self.hosts.append(host)  # before creating it, so a failure half-way is torn down
            try:
                _run("ip", "netns", "add", name)
                _run("ip", "link", "add", host.link, "type", "veth", "peer", "name", host.peer)
                _run("ip", "link", "set", host.peer, "netns", name)
                _run("ip", "addr", "add", f"{gateway}/30", "dev", host.link)
                _run("ip", "link", "set", host.link, "up")
                _run("ip", "-n", name, "addr", "add", f"{address}/30", "dev", host.peer)
                _run("ip", "-n", name, "link", "set", host.peer, "up")
                _run("ip", "-n", name, "link", "set", "lo", "up")
            except BaseException:
                self._remove(host)
                raise
        if mbit is not None:
            host.shape(mbit)
        return host

    def _free_subnet(self) -> ipaddress.IPv4Network:
        used = _used_subnets()
        subnets = list(NETWORK.subnets(new_prefix=30))
        start = (self.pid * 7 + len(self.hosts)) % len(subnets)
        for step in range(len(subnets)):
            candidate = subnets[(start + step) % len(subnets)]
            if candidate not in used:
                return candidate
        raise WanUnavailable(f"no free /30 left in {NETWORK}")

    def _remove(self, host: Host) -> None:
        # Deleting the namespace destroys its veth end, and with it the root-side end;
        # the link delete covers a failure before the peer moved into the namespace.
        _run("ip", "netns", "del", host.name, check=False)
        _run("ip", "link", "del", host.link, check=False)
        with contextlib.suppress(ValueError):
            self.hosts.remove(host)

    def close(self) -> None:
        for host in list(self.hosts):
            self._remove(host)


def leftovers(pid: int | None = None) -> list[str]:
    """Rig namespaces and root-side links of ``pid`` (default: this process) still present."""
    owner = str(os.getpid() if pid is None else pid)
    names = [line.split(" ", 1)[0] for line in _run("ip", "netns", "list").stdout.splitlines()]
    for line in _run("ip", "-o", "link", "show").stdout.splitlines():
        parts = line.split(": ", 2)
        if len(parts) > 1:
            names.append(parts[1].split("@", 1)[0])
    found = [(n, _NAMESPACE.match(n) or _LINK.match(n)) for n in names]
    return [n for n, m in found if m is not None and m.group(1) == owner]


@pytest.fixture
def wan_rig() -> Iterator[WanRig]:
    """A ``WanRig`` torn down after the test; skips loudly where namespaces cannot be made."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"WAN RIG UNAVAILABLE: {reason}")
    with WanRig() as rig:
        yield rig
