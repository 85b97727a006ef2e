"""The processes a benchmark run compares: nginx, Varnish, Traffic Server, Glance, imagecache.

Each peer is a context manager that starts a real server on a free loopback port,
in its own directory under the run's work dir, and stops exactly the process it
started (never by name: other engineers run servers on this machine too).

Standalone check (no imagecache needed)::

    .venv/bin/python bench/peers.py --size-mib 64
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GLANCE_PEER = REPO.parent / "shared" / "peers" / "glance-peer.sh"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
VARNISHD = shutil.which("varnishd") or "/usr/sbin/varnishd"
TRAFFIC_SERVER = shutil.which("traffic_server") or "/usr/bin/traffic_server"
CHUNK = 8 << 20


class PeerError(RuntimeError):
    """A peer could not be started or did not answer as expected."""


def free_port() -> int:
    """A port nobody listens on right now (there is a tiny race; the servers bind at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll ``check`` until it is true; a server that never answers is a PeerError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise PeerError(f"{what}: not ready after {timeout:.0f}s")


def settle_fill(cache_dir: Path, image_id: str) -> None:
    """Wait until no fill of ``image_id`` is in progress in imagecache's ``cache_dir``.

    A client has its last byte once the fill is verified, a moment before the
    commit; an eviction sent in between would miss the entry, and the next
    "cold" round would be a hit.
    """
    incomplete = cache_dir / "incomplete" / image_id
    wait_until(f"the fill of {image_id} to commit", lambda: not incomplete.exists())


def http_status(
    url: str, method: str = "GET", timeout: float = 5.0, headers: Mapping[str, str] | None = None
) -> int:
    """The status of one request (0 when nothing answers)."""
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def http_json(
    url: str,
    method: str = "GET",
    body: object = None,
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def write_random_file(path: Path, size: int) -> None:
    """``size`` random bytes (incompressible, so no layer can cheat)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as out:
        left = size
        while left:
            n = min(left, CHUNK)
            out.write(os.urandom(n))
            left -= n
    tmp.replace(path)


def file_digests(path: Path) -> tuple[str, str]:
    """(md5, sha512) hex digests of a file."""
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    with open(path, "rb") as src:
        while block := src.read(CHUNK):
            md5.update(block)
            sha512.update(block)
    return md5.hexdigest(), sha512.hexdigest()


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Stop the process we started (and its group, if it leads one) and reap it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (read from /proc; workers of a pre-fork server)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, []))
    return out


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: Sequence[int]) -> dict[int, int]:
    """utime + stime of each process (all its threads), in clock ticks; gone ones are left out."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # After the command name: state is field 3, utime and stime fields 14 and 15.
        fields = stat.rsplit(")", 1)[1].split()
        out[pid] = int(fields[11]) + int(fields[12])
    return out


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds the processes used between two ``cpu_ticks`` readings.

    A process that appeared in between counts whole; one that exited in between
    is lost (the servers measured here keep their workers for the whole run).
    """
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / CLOCK_TICKS


def proc_status_kib(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style value from /proc/<pid>/status, in KiB (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def full_body_gets(access_log: Path, path: str) -> int:
    """Lines of a combined-format access log for ``GET path`` answered 200 (not 206/304)."""
    if not access_log.exists():
        return 0
    pattern = re.compile(rf'"GET {re.escape(path)} HTTP/[\d.]+" 200 ')
    with access_log.open() as lines:
        return sum(pattern.search(line) is not None for line in lines)


def head_requests(access_log: Path, path: str) -> int:
    """Lines of a combined-format access log for ``HEAD path``: the http upstream's info."""
    if not access_log.exists():
        return 0
    pattern = re.compile(rf'"HEAD {re.escape(path)} HTTP/[\d.]+" ')
    with access_log.open() as lines:
        return sum(pattern.search(line) is not None for line in lines)


# ---------------------------------------------------------------- nginx ---


@dataclass
class Nginx:
    """nginx in the foreground with its own prefix, pid, logs and temp dirs.

    ``root`` serves files from a directory with sendfile; ``proxy_to`` makes it a
    plain pass-through (no buffering, no caching) to another server, or with
    ``proxy_cache`` a caching proxy of it (bench/edge.py): ``proxy_cache_lock``
    on, so a herd's misses wait for one origin fetch, with the lock's timeout
    and age raised to an hour (at the 5 s defaults every waiter of a fill
    longer than 5 s goes to the origin itself, uncached).

    ``listen_host`` and ``netns`` put an origin inside a WAN-rig namespace
    (tests/peers/wan.py), started by ``ip netns exec``; ``limit_rate`` caps
    each connection's response rate (nginx's ``limit_rate``, bytes/s).
    """

    workdir: Path
    root: Path | None = None
    proxy_to: str | None = None
    workers: int = 2
    access_log: bool = False
    # False: read/write through 1 MiB buffers instead (on these VMs a single
    # loopback stream is often faster copied than spliced; reported for context).
    sendfile: bool = True
    # file name -> md5 hex, sent as Content-MD5 (what the http upstream verifies against)
    md5_headers: dict[str, str] = field(default_factory=dict)
    proxy_cache: bool = False
    listen_host: str = "127.0.0.1"
    netns: str | None = None
    limit_rate: int | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    @property
    def access_log_path(self) -> Path:
        return self.workdir / "access.log"

    def config(self) -> str:
        d = self.workdir
        cache_path = ""
        if self.root is not None:
            location = f"root {self.root};"
        elif self.proxy_to is not None and self.proxy_cache:
            cache_path = (
                f"proxy_cache_path {d}/cache levels=1:2 keys_zone=edge:16m "
                "max_size=100g inactive=1d use_temp_path=off;"
            )
            location = (
                f"proxy_pass {self.proxy_to}; proxy_http_version 1.1; "
                'proxy_set_header Connection ""; proxy_buffer_size 1m; proxy_buffers 4 1m; '
                "proxy_cache edge; proxy_cache_valid 200 1d; proxy_cache_lock on; "
                "proxy_cache_lock_timeout 1h; proxy_cache_lock_age 1h; "
                "proxy_read_timeout 60s;"
            )
        elif self.proxy_to is not None:
            # Stream straight through, as a pass-through should: no temp files.
            location = (
                f"proxy_pass {self.proxy_to}; proxy_http_version 1.1; "
                "proxy_buffering off; proxy_request_buffering off; "
                # Read the origin in 1 MiB steps: the 4-8 KiB default halves the rate.
                "proxy_buffer_size 1m; proxy_buffers 4 1m; "
                'proxy_set_header Connection "";'
            )
        else:
            raise PeerError("nginx needs a root or a proxy_to")
        exact = "".join(
            f"location = /{name} {{ {location} add_header Content-MD5 {md5}; }}\n"
            for name, md5 in self.md5_headers.items()
        )
        limit = "" if self.limit_rate is None else f"limit_rate {self.limit_rate};"
        log = f"access_log {d}/access.log;" if self.access_log else "access_log off;"
        # As root, nginx workers would drop to "nobody" and could not read the
        # private temp dirs the images live in; keep them as the invoking user.
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""
daemon off;
{user}
master_process on;
worker_processes {self.workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log}
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    default_type application/octet-stream;
    {"sendfile on;" if self.sendfile else "sendfile off; output_buffers 2 1m;"}
    tcp_nopush on;
    {cache_path}
    keepalive_timeout 65;
    keepalive_requests 100000;
    server {{
        listen {self.listen_host}:{self.port} reuseport;
        {limit}
        location / {{ {location} }}
        {exact}
    }}
}}
"""

    def __enter__(self) -> Nginx:
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        # The child keeps its own copy of the log descriptor; ours closes at once.
        cmd = [NGINX, "-p", str(self.workdir), "-c", str(conf)]
        cmd += ["-e", str(self.workdir / "error.log")]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]  # execs nginx: the pid stays its
        with open(self.workdir / "stderr.log", "wb") as errors:
            self.proc = subprocess.Popen(cmd, stdout=errors, stderr=errors, start_new_session=True)
        try:
            wait_until("nginx", lambda: self._answers(), timeout=15)
        except PeerError:
            self.__exit__(None, None, None)
            log = (self.workdir / "error.log").read_text()
            raise PeerError(f"nginx did not start: {log}") from None
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PeerError(f"nginx exited: {(self.workdir / 'error.log').read_text()}")
        return http_status(self.url + "/", method="HEAD") != 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGQUIT)  # graceful: finish open responses
            self.proc = None

    def requests_for(self, path: str) -> int:
        """How many full-body GETs of ``path`` (status 200) the access log shows."""
        return full_body_gets(self.access_log_path, path)

    def heads_for(self, path: str) -> int:
        """How many ``HEAD``s of ``path`` (an http upstream's metadata reads) the log shows."""
        return head_requests(self.access_log_path, path)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []


# -------------------------------------------------------- Glance peer ---


@dataclass
class GlancePeer:
    """One real Glance API (the shared peer script) with its own data dir and port.

    ``cache=True`` turns on Glance's image cache (the performance peer);
    ``cache=False`` is a plain origin for imagecache's glance upstream.
    """

    datadir: Path
    cache: bool = True
    workers: int = 1
    port: int = field(default_factory=free_port)
    started: bool = False
    # Inside a WAN-rig namespace (bench/edge.py): the script runs there, Glance
    # listens on that namespace's loopback, and ``reach_url`` (a relay into the
    # namespace) is how this process reaches it.
    netns: str | None = None
    reach_url: str | None = None
    auth: str = "noauth"  # GLANCE_PEER_AUTH: noauth | headers | keystone
    home: Path | None = None  # HOME of the server: its ~/.glance/glance.conf.d overrides

    @property
    def url(self) -> str:
        return self.reach_url or f"http://127.0.0.1:{self.port}"

    @staticmethod
    def available() -> bool:
        return GLANCE_PEER.exists() and Path("/opt/peers/glance-venv/bin/gunicorn").exists()

    def _script(self, *args: str) -> str:
        env = dict(
            os.environ,
            GLANCE_PEER_DATA=str(self.datadir),
            GLANCE_PEER_PORT=str(self.port),
            GLANCE_PEER_CACHE="1" if self.cache else "0",
            GLANCE_PEER_WORKERS=str(self.workers),
            GLANCE_PEER_AUTH=self.auth,
        )
        if self.home is not None:
            # oslo.config reads ~/.glance/glance.conf.d/*.conf after the
            # script's glance-api.conf: settings the script has no variable for.
            env["HOME"] = str(self.home)
        argv = ["bash", str(GLANCE_PEER), *args]
        if self.netns is not None:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PeerError(f"glance-peer.sh {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def __enter__(self) -> GlancePeer:
        if not self.available():
            raise PeerError(f"Glance peer not installed: run bench/setup.sh ({GLANCE_PEER})")
        self._script("start")
        self.started = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self._script("stop")
            self.started = False

    def upload(self, path: Path, name: str) -> str:
        """Create an image from ``path`` through the REST API; return its id."""
        image = http_json(
            self.url + "/v2/images",
            "POST",
            {"name": name, "disk_format": "raw", "container_format": "bare"},
        )
        assert isinstance(image, dict)
        image_id = str(image["id"])
        # curl streams the file; urllib would read 1 GiB into memory first.
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"]
        cmd += ["-T", str(path), "-H", "Content-Type: application/octet-stream"]
        cmd += [f"{self.url}/v2/images/{image_id}/file"]
        code = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        if code != "204":
            raise PeerError(f"upload of {path} to Glance failed: HTTP {code}")
        return image_id

    def image(self, image_id: str) -> dict[str, object]:
        info = http_json(f"{self.url}/v2/images/{image_id}")
        assert isinstance(info, dict)
        return info

    def file_url(self, image_id: str) -> str:
        return f"{self.url}/v2/images/{image_id}/file"

    def cached_ids(self) -> list[str]:
        listing = http_json(self.url + "/v2/cache")
        assert isinstance(listing, dict)
        return [str(item["image_id"]) for item in listing.get("cached_images", [])]

    def fill_cache(self, image_id: str) -> None:
        """One full GET tees the image into Glance's cache; wait until it is listed."""
        subprocess.run(["curl", "-sS", "-o", "/dev/null", self.file_url(image_id)], check=True)
        wait_until("glance cache fill", lambda: image_id in self.cached_ids(), timeout=60)

    def evict(self, image_id: str) -> None:
        status = http_status(f"{self.url}/v2/cache/{image_id}", method="DELETE")
        if status not in (204, 404):
            raise PeerError(f"DELETE /v2/cache/{image_id} on Glance: HTTP {status}")

    def body_reads(self, image_id: str) -> int:
        """How many full-body GETs (200) of the image's data the access log shows.

        A proxy's access checks are 1-byte Range GETs (206) and are not body reads.
        """
        return full_body_gets(self.datadir / "log" / "access.log", f"/v2/images/{image_id}/file")


# -------------------------------------------------------------- Varnish ---


def _purge(url: str) -> None:
    """Drop one object from a cache that takes PURGE (200 purged, 404 was not there)."""
    status = http_status(url, method="PURGE")
    if status not in (200, 404):
        raise PeerError(f"PURGE {url}: HTTP {status}")


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host, int(port)


@dataclass
class Varnish:
    """varnishd in the foreground (``-F``) in front of ``origin``, with malloc storage.

    Its VCL sets a TTL long enough for the whole run (the built-in 120 s
    would expire the warm image between rounds of a 1 GiB run) and takes PURGE
    from loopback (the bench drops each cold image after its round, so the
    malloc storage never has to evict mid-fill); everything else
    is Varnish's default: streaming on (``beresp.do_stream``, the Varnish 7
    default), a miss fetches the whole object and Range is answered from it,
    concurrent misses of one object wait on a single backend fetch.
    No management port (``-T none``), no jail (``-j none``: the run is root, and
    its work dir need not be handed to the ``varnish`` user); listens on loopback only.
    """

    workdir: Path
    origin: str
    storage_bytes: int
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "varnishd.pid"

    @staticmethod
    def available() -> bool:
        return Path(VARNISHD).exists()

    def vcl(self) -> str:
        host, port = _host_port(self.origin)
        return f"""vcl 4.1;

backend origin {{
    .host = "{host}";
    .port = "{port}";
    .first_byte_timeout = 60s;
    .between_bytes_timeout = 60s;
}}

acl purgers {{ "127.0.0.1"; }}

sub vcl_recv {{
    if (req.method == "PURGE") {{
        if (client.ip !~ purgers) {{
            return (synth(405));
        }}
        return (purge);
    }}
}}

sub vcl_backend_response {{
    if (beresp.status == 200) {{
        set beresp.ttl = 1d;
        set beresp.grace = 0s;
    }}
}}
"""

    def __enter__(self) -> Varnish:
        if not self.available():
            raise PeerError(f"{VARNISHD} not found: run bench/setup.sh")
        self.workdir.mkdir(parents=True, exist_ok=True)
        vcl = self.workdir / "bench.vcl"
        vcl.write_text(self.vcl())
        cmd = [VARNISHD, "-F", "-j", "none", "-T", "none"]
        cmd += ["-n", str(self.workdir / "state"), "-P", str(self.pid_file)]
        cmd += ["-a", f"127.0.0.1:{self.port}", "-f", str(vcl)]
        cmd += ["-s", f"malloc,{max(self.storage_bytes >> 20, 64)}m"]
        with open(self.workdir / "varnishd.log", "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        try:
            wait_until("varnishd", self._answers, timeout=60)
        except PeerError:
            self.__exit__(None, None, None)
            raise
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.workdir / "varnishd.log").read_text()[-2000:]
            raise PeerError(f"varnishd exited ({self.proc.returncode}): {log}")
        return http_status(self.url + "/", method="HEAD") != 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)  # the manager's group: manager and cache child
            self.proc = None

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def purge(self, path: str) -> None:
        _purge(self.url + path)

    @staticmethod
    def version() -> str:
        """``Varnish 7.1.1`` (empty when it cannot be run)."""
        done = subprocess.run([VARNISHD, "-V"], capture_output=True, text=True, check=False)
        found = re.search(r"varnish-([\d.]+)", done.stderr + done.stdout)
        return f"Varnish {found.group(1)}" if found else ""


# ------------------------------------------------------- Traffic Server ---


@dataclass
class TrafficServer:
    """traffic_server (no traffic_manager) as a reverse proxy of ``origin``.

    Everything it reads or writes is under ``workdir`` (a runroot of its own:
    config, logs, runtime, and the cache file), none of /etc/trafficserver.
    Read-while-writer is on, with the settings its documentation lists for it
    (no maximum document size, background fill, open-read retries so that a
    herd's followers wait for the writer instead of going to the origin).
    It listens on one loopback port and nothing else (no traffic_manager, so no
    management port; the crash-log helper is off). PURGE is taken from loopback
    only, which the bench uses to drop each cold image after its round.
    """

    workdir: Path
    origin: str
    cache_bytes: int
    threads: int = 2
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "traffic_server.pid"

    @staticmethod
    def available() -> bool:
        return Path(TRAFFIC_SERVER).exists()

    def records(self) -> str:
        settings: dict[str, tuple[str, object]] = {
            "proxy.config.http.server_ports": ("STRING", f"{self.port}:ipv4:ip-in=127.0.0.1"),
            # "#-1": stay the invoking user (the run's files are its own).
            "proxy.config.admin.user_id": ("STRING", "#-1"),
            "proxy.config.crash_log_helper": ("STRING", "NULL"),
            "proxy.config.reverse_proxy.enabled": ("INT", 1),
            "proxy.config.url_remap.remap_required": ("INT", 1),
            # The origin (nginx) sends Last-Modified but no Cache-Control:
            # cache it anyway, for longer than the run.
            "proxy.config.http.cache.required_headers": ("INT", 0),
            "proxy.config.http.cache.heuristic_min_lifetime": ("INT", 86400),
            "proxy.config.http.cache.heuristic_max_lifetime": ("INT", 86400),
            "proxy.config.cache.enable_read_while_writer": ("INT", 1),
            "proxy.config.cache.max_doc_size": ("INT", 0),
            "proxy.config.http.background_fill_completed_threshold": ("FLOAT", 0.0),
            "proxy.config.http.cache.max_open_read_retries": ("INT", 200),
            "proxy.config.http.cache.open_read_retry_time": ("INT", 10),
            # Few, large objects: a directory sized for them, not for 8 KB pages.
            "proxy.config.cache.min_average_object_size": ("INT", 1 << 20),
            "proxy.config.exec_thread.autoconfig": ("INT", 0),
            "proxy.config.exec_thread.limit": ("INT", self.threads),
            "proxy.config.net.connections_throttle": ("INT", 4096),
            "proxy.config.log.logging_enabled": ("INT", 0),
            "proxy.config.http.insert_response_via_str": ("INT", 0),
            "proxy.config.body_factory.enable_customizations": ("INT", 0),
            "proxy.config.body_factory.template_sets_dir": (
                "STRING",
                "/etc/trafficserver/body_factory",
            ),
        }
        return "".join(f"CONFIG {k} {t} {v}\n" for k, (t, v) in settings.items())

    def _layout(self) -> Path:
        etc, run, log, cache = (self.workdir / d for d in ("etc", "run", "log", "cache"))
        for d in (etc, run, log, cache):
            d.mkdir(parents=True, exist_ok=True)
        runroot = self.workdir / "runroot.yaml"
        runroot.write_text(
            "prefix: /usr\nexec_prefix: /usr\nbindir: /usr/bin\nsbindir: /usr/sbin\n"
            f"sysconfdir: {etc}\ndatadir: /usr/share/trafficserver\n"
            "includedir: /usr/include\nlibdir: /usr/lib/trafficserver\n"
            "libexecdir: /usr/lib/trafficserver/modules\n"
            f"localstatedir: {run}\nruntimedir: {run}\nlogdir: {log}\ncachedir: {cache}\n"
        )
        (etc / "records.config").write_text(self.records())
        (etc / "remap.config").write_text(f"map / {self.origin.rstrip('/')}/\n")
        cache_file = cache / "cache.db"
        # A sparse file: Traffic Server writes only what it caches.
        with open(cache_file, "wb") as out:
            out.truncate(self.cache_bytes)
        (etc / "storage.config").write_text(f"{cache_file} {self.cache_bytes >> 20}M\n")
        (etc / "ip_allow.yaml").write_text(
            "ip_allow:\n"
            "  - apply: in\n    ip_addrs: 127.0.0.1\n    action: allow\n    methods: ALL\n"
            "  - apply: in\n    ip_addrs: 0/0\n    action: deny\n    methods: ALL\n"
        )
        for empty in ("plugin.config", "hosting.config", "volume.config", "parent.config"):
            (etc / empty).write_text("")
        (etc / "cache.config").write_text("")
        return runroot

    def __enter__(self) -> TrafficServer:
        if not self.available():
            raise PeerError(f"{TRAFFIC_SERVER} not found: run bench/setup.sh")
        runroot = self._layout()
        cmd = [TRAFFIC_SERVER, f"--run-root={runroot}"]
        with open(self.workdir / "traffic_server.out", "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=out, cwd=self.workdir, start_new_session=True
            )
        self.pid_file.write_text(f"{self.proc.pid}\n")
        try:
            # Listening comes before the cache is open; a request in between
            # would not be cached, so wait for the diagnostics to say so too.
            wait_until("traffic_server", self._ready, timeout=60)
        except PeerError:
            self.__exit__(None, None, None)
            raise
        return self

    def _diags(self) -> str:
        path = self.workdir / "log" / "diags.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PeerError(
                f"traffic_server exited ({self.proc.returncode}): {self._diags()[-2000:]}"
            )
        if "Cache Disabled" in self._diags():
            raise PeerError(f"traffic_server: cache disabled: {self._diags()[-2000:]}")
        return "cache enabled" in self._diags() and http_status(self.url + "/", "HEAD") != 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
            self.pid_file.unlink(missing_ok=True)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def purge(self, path: str) -> None:
        _purge(self.url + path)  # ip_allow.yaml lets loopback use PURGE

    @staticmethod
    def version() -> str:
        """``Traffic Server 9.2.9`` (empty when it cannot be run)."""
        done = subprocess.run([TRAFFIC_SERVER, "-V"], capture_output=True, text=True, check=False)
        found = re.search(r"Traffic Server ([\d.]+)", done.stdout + done.stderr)
        return f"Traffic Server {found.group(1)}" if found else ""


# ------------------------------------------------------------ imagecache ---


@dataclass
class Imagecache:
    """``imagecache serve`` as its users run it, on a free port with its own cache dir."""

    cache_dir: Path
    upstream: str
    workers: int = 2
    extra_args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def file_url(self, image_id: str) -> str:
        return f"{self.url}/v2/images/{image_id}/file"

    def __enter__(self) -> Imagecache:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.cache_dir.parent / f"imagecache-{self.port}.log"
        exe = REPO / ".venv" / "bin" / "imagecache"
        cmd = [str(exe) if exe.exists() else "imagecache", "serve"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--cache-dir", str(self.cache_dir), "--upstream", self.upstream]
        cmd += ["--workers", str(self.workers), *self.extra_args]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log_path.read_text()[-2000:] if self.log_path else ""
                raise PeerError(f"imagecache exited ({self.proc.returncode}): {tail}")
            return http_status(self.url + "/healthcheck") == 200

        try:
            wait_until("imagecache", healthy, timeout=60)
        except PeerError:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc is not None else []

    def rss_kib(self) -> int:
        return sum(proc_status_kib(pid, "VmRSS") for pid in self.pids())

    def hwm_kib(self) -> int:
        return sum(proc_status_kib(pid, "VmHWM") for pid in self.pids())

    def fds(self) -> int:
        return sum(open_fds(pid) for pid in self.pids())

    def evict(self, image_id: str) -> None:
        settle_fill(self.cache_dir, image_id)
        status = http_status(f"{self.url}/v2/cache/{image_id}", method="DELETE")
        if status not in (204, 404):
            raise PeerError(f"DELETE /v2/cache/{image_id} on imagecache: HTTP {status}")


# ------------------------------------------------------------ self-check ---


def _self_check(size_mib: int) -> None:
    """Start nginx (static and proxy) and the Glance peer, move one image through each."""
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(tmp)
        image = work / "images" / "img"
        write_random_file(image, size_mib << 20)
        md5, _ = file_digests(image)
        with Nginx(work / "nginx", root=image.parent, access_log=True) as web:
            got = subprocess.run(
                ["curl", "-sS", f"{web.url}/img"], capture_output=True, check=True
            ).stdout
            assert hashlib.md5(got).hexdigest() == md5, "nginx static: wrong bytes"
            with Nginx(work / "proxy", proxy_to=web.url) as proxy:
                got = subprocess.run(
                    ["curl", "-sS", f"{proxy.url}/img"], capture_output=True, check=True
                ).stdout
                assert hashlib.md5(got).hexdigest() == md5, "nginx proxy: wrong bytes"
            assert web.requests_for("/img") == 2, web.requests_for("/img")
            print(f"nginx static + proxy OK on ports {web.port}/{proxy.port}")
            caches: list[Varnish | TrafficServer] = []
            if Varnish.available():
                caches.append(Varnish(work / "varnish", web.url, 2 * (size_mib << 20)))
            if TrafficServer.available():
                caches.append(TrafficServer(work / "ats", web.url, 4 * (size_mib << 20)))
            for cache in caches:
                reads = web.requests_for("/img")
                with cache:
                    for _ in range(3):
                        got = subprocess.run(
                            ["curl", "-sS", f"{cache.url}/img"], capture_output=True, check=True
                        ).stdout
                        assert hashlib.md5(got).hexdigest() == md5, f"{cache}: wrong bytes"
                    assert web.requests_for("/img") == reads + 1, "the cache did not cache"
                    cache.purge("/img")
                    subprocess.run(
                        ["curl", "-sS", "-o", "/dev/null", f"{cache.url}/img"], check=True
                    )
                    assert web.requests_for("/img") == reads + 2, "PURGE did not drop it"
                print(
                    f"{type(cache).__name__} OK on port {cache.port}: 3 GETs, 1 origin read, purge"
                )
        if not GlancePeer.available():
            print("Glance peer not installed: skipped (run bench/setup.sh)")
            return
        with GlancePeer(work / "glance", cache=True) as glance:
            image_id = glance.upload(image, "bench-self-check")
            assert glance.image(image_id)["checksum"] == md5, "glance: checksum differs"
            glance.fill_cache(image_id)
            reads = glance.body_reads(image_id)
            glance.evict(image_id)
            assert image_id not in glance.cached_ids()
            print(f"glance OK on port {glance.port}: image {image_id}, {reads} body read(s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    _self_check(parser.parse_args().size_mib)
    sys.exit(0)
