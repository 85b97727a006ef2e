"""Edge-site boot storm (issue 15): N clients, one cold image, an origin 40 ms and 200 Mbit/s away.

    nice .venv/bin/python bench/edge.py --size-mib 256 --clients 20 --json edge.json

Runs as root, on the WAN rig (tests/peers/wan.py, tests/peers/relay.py,
docs/testing.md "WAN rig"). Topology::

    root namespace (the edge)                          namespace ic<pid>o (origin site)
    clients (curl | openssl dgst -sha256) x N
      -> subject (imagecache / nginx / Varnish)
      -> relay (20 ms each way, resets, byte counts)
      ===== veth, tc TBF 200 Mbit/s each way =====    nginx serving the image (sendfile,
                                                      access log); a second nginx with
                                                      limit_rate for per-connection-limit

                                                      namespace ic<pid>g (second origin)
      ===== veth, tc TBF 200 Mbit/s each way =====    relay (no delay) -> the Glance peer
                                                      on that namespace's loopback

Subjects (``--only``), each started fresh per scenario with its own relay, so
the relay's origin->edge byte count is that subject's link bytes:

- ``imagecache``: ``imagecache serve --workers 2``, http upstream through the
  relay, sha512 sidecar verified; resumable fills at their defaults
  (``upstream_resume_attempts`` 5, ``upstream_resume_backoff`` 0.5 s);
- ``imagecache-glance``: the same, glance upstream, the Glance peer as origin
  (storm and storm-reset only: the Glance peer has no per-connection limit);
- ``nginx``: ``proxy_cache`` with ``proxy_cache_lock on`` (lock timeout and
  age 1 h, see bench/peers.py: at the 5 s defaults every waiter refetches);
- ``varnish``: Varnish, malloc storage, streaming (``beresp.do_stream``, on by
  default in Varnish 7);
- ``glance-cache``: a real Glance (the peer script, ``--workers`` gunicorn
  processes of 8 threads) at the edge with its image cache on, holding each
  image only as an ``http`` store location across the link (the nginx
  origin, through the relay), registered before the round with the location
  API and the origin's sha512 (bench/edge_glance.py says what that takes);
  the clients GET ``/v2/images/<id>/file`` with a member's trusted identity
  headers. Not run: an edge Glance sharing the central database (its file
  store is not reachable from the edge), or one importing the image
  (``web-download`` copies at import: a copy, not a cache).

Scenarios (``--scenarios``):

- ``storm``: N clients at once on one image none of the subjects has seen;
- ``storm-reset``: the same, and the relay resets the first connection that
  carries half the image (``reset_after(size / 2, times=1)``);
- ``per-connection-limit``: the origin caps each connection at a quarter of
  the link (nginx ``limit_rate`` 6.25 MB/s = 50 Mbit/s). imagecache runs it
  with one connection per fill and, with ``--segments N`` (N > 1), again with
  ``fill_segments = N`` (fill/segments.py; ``fill_segment_size`` 16 MiB, so
  images from 32 MiB are segmented): segmented vs not, side by side.

Per round and subject: bytes over the link (relay, origin->edge), time until
the last client has the whole image and its sha256 checked, median and worst
time to first byte, every client's bytes checked, the physical bound (image
size / link rate) and the ratios. Every round takes a fresh image name (a
hard link in the origin's directory; a fresh upload to Glance), so every
subject is cold the same way. Every client has ``--max-time``; namespaces,
relays and servers go on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import edge_glance
import edge_report as er
import edge_timeline
from peers import (
    GlancePeer,
    Imagecache,
    Nginx,
    PeerError,
    Varnish,
    http_json,
    http_status,
    write_random_file,
)

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
LINK_MBIT = 200.0
GLANCE_VERSION = "33"  # what glance-peer.sh installs
DELAY_S = 0.020  # one way: 40 ms round trip
ORIGIN_PORT = 8080
SUBJECTS = ("imagecache", "imagecache-glance", "nginx", "varnish", "glance-cache")
SCENARIOS = ("storm", "storm-reset", "per-connection-limit")


def _load(name: str, path: Path) -> ModuleType:
    """Import a module of tests/peers by its path.

    bench/peers.py is ``peers`` on this script's path, and tests/peers is a
    package of the same name, so the rig's modules are loaded under names of
    their own (neither imports the rest of its package).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


wan = _load("edge_wan", TESTS / "peers" / "wan.py")
relay_mod = _load("edge_relay", TESTS / "peers" / "relay.py")


def sha256_of(path: Path) -> str:
    done = subprocess.run(
        ["openssl", "dgst", "-sha256", "-r", str(path)], capture_output=True, text=True, check=True
    )
    return done.stdout.split()[0]


# -------------------------------------------------------------- clients ---


def run_clients(
    url: str, count: int, max_time: float, curl_args: tuple[str, ...] = ()
) -> list[er.ClientResult]:
    """``count`` pipelines ``curl URL | openssl dgst -sha256`` started at once.

    Each in a session of its own, so that an interrupted run kills exactly
    its clients (curl and openssl alike) by their process groups.
    ``curl_args`` go before the URL (the edge Glance's identity headers).
    """
    script = (
        f"curl -sS --max-time {int(max_time)} -o - -w '{er.CLIENT_FORMAT}' \"$@\""
        " | openssl dgst -sha256 -r"
    )
    started = time.monotonic()
    procs: list[subprocess.Popen[str]] = []
    results: list[er.ClientResult | None] = [None] * count

    def wait(index: int) -> None:
        proc = procs[index]
        try:
            out, err = proc.communicate(timeout=max_time + 30)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
        results[index] = er.parse_client(out, err, time.monotonic() - started)

    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    ["bash", "-c", script, "client", *curl_args, url],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        waiters = [threading.Thread(target=wait, args=(i,)) for i in range(count)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join()
    finally:
        for proc in procs:
            _kill_group(proc)
    return [r for r in results if r is not None]


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------- sites ---


@dataclass
class Origin:
    """What a subject fetches from: an address behind the shaped link, and its log."""

    name: str
    host: Any  # peers.wan.Host
    target: tuple[str, int]  # where the edge-side relay connects
    body_path: Callable[[str], str]  # image id -> path of its bytes at the origin
    fresh: Callable[[], str]  # a new image nobody has fetched; its id
    log_lines: Callable[[], list[str]]
    log_prefix: Callable[[str], str]


def nginx_origin(
    stack: contextlib.ExitStack, work: Path, host: Any, image: Path, limit: int | None
) -> Origin:
    """nginx in the origin namespace serving ``image`` under fresh names (hard links)."""
    images = image.parent
    name = "nginx-limited" if limit else "nginx"
    server: Nginx = stack.enter_context(
        Nginx(
            work / f"origin-{name}",
            root=images,
            access_log=True,
            listen_host=host.address,
            netns=host.name,
            limit_rate=limit,
            port=ORIGIN_PORT + (1 if limit else 0),
        )
    )
    md5, sha512 = (image.with_suffix(s).read_text() for s in (".md5", ".sha512"))

    def fresh() -> str:
        image_id = str(uuid.uuid4())
        os.link(image, images / image_id)
        (images / f"{image_id}.md5").write_text(md5)
        (images / f"{image_id}.sha512").write_text(sha512)
        return image_id

    def lines() -> list[str]:
        path = server.access_log_path
        return path.read_text().splitlines() if path.exists() else []

    return Origin(
        name,
        host,
        (host.address, server.port),
        lambda iid: f"/{iid}",
        fresh,
        lines,
        lambda iid: f"/{iid}",
    )


def glance_origin(stack: contextlib.ExitStack, work: Path, host: Any, image: Path) -> Origin:
    """The Glance peer inside ``host``'s namespace, reached by a relay there."""
    glance = GlancePeer(work / "glance-origin", cache=False, netns=host.name)
    stack.enter_context(glance)
    inner = stack.enter_context(
        relay_mod.RelayProcess(("127.0.0.1", glance.port), listen=host.address, netns=host.name)
    )
    glance.reach_url = inner.url

    def fresh() -> str:
        # Uploads cross the link too: unshaped meanwhile, so setup stays short.
        host.shape(None)
        try:
            return glance.upload(image, f"edge-{uuid.uuid4()}")
        finally:
            host.shape(LINK_MBIT)

    def lines() -> list[str]:
        path = glance.datadir / "log" / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    return Origin(
        "glance",
        host,
        (host.address, inner.port),
        lambda iid: f"/v2/images/{iid}/file",
        fresh,
        lines,
        lambda iid: f"/v2/images/{iid}",
    )


# ------------------------------------------------------------- subjects ---


@dataclass
class Edge:
    label: str
    url_for: Callable[[str], str]
    after: Callable[[str], list[str]]  # after a round: settle, drop the image; notes
    log_path: Path | None = None  # the subject's own log, for --timeline
    # Before a round's counters start: what the subject needs to know of a new image.
    prepare: Callable[[str], None] = lambda image_id: None
    curl_args: tuple[str, ...] = ()  # for every client


def _nothing(image_id: str) -> list[str]:
    return []


@contextlib.contextmanager
def glance_cache_subject(work: Path, upstream: str, workers: int) -> Iterator[Edge]:
    """A real Glance at the edge, cache on, whose images live at ``upstream`` (edge_glance.py)."""
    home = work / "home"
    conf = home / ".glance" / "glance.conf.d" / "edge.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(edge_glance.edge_conf(upstream))
    peer = GlancePeer(work / "glance", cache=True, workers=workers, auth="headers", home=home)
    with peer:
        edge = edge_glance.EdgeGlance(peer.url, upstream, http_json, http_status)

        def prepare(image_id: str) -> None:
            # The origin's published sha512 (the sidecar imagecache reads too).
            with urllib.request.urlopen(f"{upstream}/{image_id}.sha512", timeout=30) as resp:
                sha512 = resp.read().decode().split()[0]
            edge.register(image_id, sha512)

        yield Edge(
            f"Glance {GLANCE_VERSION} + image cache (http store, {workers}x8 threads)",
            edge.file_url,
            edge.evict,
            peer.datadir / "log" / "glance-api.log",
            prepare,
            tuple(edge_glance.curl_headers(edge_glance.MEMBER)),
        )


@contextlib.contextmanager
def start_subject(
    name: str, work: Path, upstream: str, size: int, workers: int, segments: int = 1
) -> Iterator[Edge]:
    """One edge subject in front of ``upstream`` (the relay's URL), stopped on leaving.

    ``segments``: imagecache's ``fill_segments`` (other subjects have no such thing).
    """
    work.mkdir(parents=True, exist_ok=True)
    if name.startswith("imagecache"):
        glance = name == "imagecache-glance"
        config = work / "imagecache.toml"
        text = "" if glance else "http_checksum_sidecar = true\n"
        if segments > 1:
            text += f"fill_segments = {segments}\nfill_segment_size = {16 * er.MIB}\n"
        config.write_text(text)
        spec = f"glance:{upstream}" if glance else f"http:{upstream}/{{image_id}}"
        with Imagecache(
            work / "cache",
            spec,
            workers=workers,
            extra_args=("--config", str(config)),
        ) as ic:

            def after(image_id: str) -> list[str]:
                try:
                    ic.evict(image_id)  # waits for the fill to commit or fail first
                except PeerError as exc:
                    return [f"after the round: {exc}"]
                return []

            kind = "glance" if glance else "http"
            split = f", {segments} segments" if segments > 1 else ""
            label = f"imagecache ({kind} upstream, {workers} workers{split})"
            yield Edge(label, ic.file_url, after, ic.log_path)
    elif name == "glance-cache":
        with glance_cache_subject(work, upstream, workers) as edge:
            yield edge
    elif name == "nginx":
        with Nginx(work, proxy_to=upstream, proxy_cache=True, workers=workers) as web:
            yield Edge(
                f"nginx proxy_cache + lock ({workers} workers)",
                lambda iid: f"{web.url}/{iid}",
                _nothing,
            )
    elif name == "varnish":
        with Varnish(work, upstream, 2 * size + 256 * er.MIB) as cache:

            def purge(image_id: str) -> list[str]:
                cache.purge(f"/{image_id}")
                return []

            yield Edge(
                f"{Varnish.version() or 'Varnish'} (streaming)",
                lambda iid: f"{cache.url}/{iid}",
                purge,
            )
    else:
        raise ValueError(name)


def wire_bytes(host: Any) -> int:
    """Bytes the root side of ``host``'s veth has received: everything the origin site sent.

    Counted by the kernel with the packets' headers, and including what the
    relay read but threw away when it reset a connection (which its own
    counters, bytes forwarded to the edge, leave out).
    """
    return int(Path(f"/sys/class/net/{host.link}/statistics/rx_bytes").read_text())


def settle_link(relay: Any, within: float = 30.0) -> Any:
    """The relay's counters once they stop moving for a second (a fetch may outlive its clients)."""
    deadline = time.monotonic() + within
    last = relay.stats()
    while time.monotonic() < deadline:
        time.sleep(1.0)  # the quiet period being measured, not a stand-in for an event
        now = relay.stats()
        if (now.down_bytes, now.up_bytes) == (last.down_bytes, last.up_bytes):
            return now
        last = now
    return last


# ---------------------------------------------------------------- rounds ---


@dataclass(frozen=True)
class Run:
    size: int
    sha256: str
    clients: int
    rounds: int
    workers: int
    max_time: float
    timeline: Path | None = None  # --timeline: a directory for each round's samples


def one_subject(
    run: Run, scenario: str, subject: str, origin: Origin, work: Path, segments: int = 1
) -> list[dict[str, object]]:
    """Start ``subject`` behind a fresh relay to ``origin``; ``run.rounds`` storms; stop it."""
    rows: list[dict[str, object]] = []
    with (
        relay_mod.RelayProcess(origin.target, delay=DELAY_S) as relay,
        start_subject(subject, work, relay.url, run.size, run.workers, segments) as edge,
    ):
        for index in range(run.rounds):
            image_id = origin.fresh()
            edge.prepare(image_id)
            log_start = len(origin.log_lines())
            before = relay.stats()
            wire_before = wire_bytes(origin.host)
            if scenario == "storm-reset":
                relay.reset_after(run.size // 2, times=1)
            print(
                f"  {scenario} / {subject} round {index + 1}: {run.clients} clients on {image_id}",
                flush=True,
            )
            with edge_timeline.Sampler(relay.stats) as sampler:
                clients = run_clients(
                    edge.url_for(image_id), run.clients, run.max_time, edge.curl_args
                )
                notes = edge.after(image_id)
                after = settle_link(relay)
            relay.reset_after(None)
            wire = wire_bytes(origin.host) - wire_before
            counts = er.origin_counts(
                origin.log_lines()[log_start:],
                origin.body_path(image_id),
                origin.log_prefix(image_id),
            )
            row = er.summarise(
                scenario=scenario,
                subject=subject,
                size=run.size,
                mbit=LINK_MBIT,
                sha256=run.sha256,
                clients=clients,
                link_down=after.down_bytes - before.down_bytes,
                link_up=after.up_bytes - before.up_bytes,
                wire_down=wire,
                resets=after.resets - before.resets,
                origin=counts,
                notes=notes,
            )
            row.update(label=edge.label, round=index + 1, origin=origin.name, segments=segments)
            if run.timeline is not None:
                row["timeline"] = write_timeline(
                    run.timeline / f"{scenario}-{subject}-{segments}-{index + 1}",
                    sampler,
                    clients,
                    edge.log_path,
                )
                print(f"    timeline: {row['timeline']}", flush=True)
            rows.append(row)
            print("    " + er.table([row])[-1], flush=True)
            for why, n in dict(row["failures"]).items():  # type: ignore[call-overload]
                print(f"    failed: {n} x {why}", flush=True)
    return rows


def write_timeline(
    stem: Path, sampler: Any, clients: list[er.ClientResult], log_path: Path | None
) -> dict[str, float | None]:
    """``stem``.json (samples, clients) and ``stem``.log (the subject's log); the summary."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    moments = edge_timeline.summary(sampler.samples)
    ends = sorted(c.seconds for c in clients)
    moments["first_client_end_s"] = round(ends[0], 3) if ends else None
    moments["last_client_end_s"] = round(ends[-1], 3) if ends else None
    record = dict(
        wall_start=sampler.wall_start,
        columns=["s", "down_bytes", "origin_bytes", "accepted", "resets"],
        samples=sampler.samples,
        clients=[dict(end_s=round(c.seconds, 3), ttfb_s=c.ttfb) for c in clients],
        summary=moments,
    )
    stem.with_suffix(".json").write_text(json.dumps(record) + "\n")
    if log_path is not None and log_path.exists():
        shutil.copyfile(log_path, stem.with_suffix(".log"))
    return moments


def storm(args: argparse.Namespace, work: Path) -> dict[str, object]:
    size = args.size_mib * er.MIB
    bound = er.physical_bound(size, LINK_MBIT)
    # Generous: the per-connection limit alone needs 4x the bound; nginx's
    # waiters need the whole fill before their first byte.
    max_time = max(120.0, 10 * bound)
    image = work / "images" / "image"
    print(f"writing a {args.size_mib} MiB random image", flush=True)
    write_random_file(image, size)
    md5 = subprocess.run(
        ["openssl", "dgst", "-md5", "-r", str(image)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    sha512 = subprocess.run(
        ["openssl", "dgst", "-sha512", "-r", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    image.with_suffix(".md5").write_text(md5 + "\n")
    image.with_suffix(".sha512").write_text(sha512 + "\n")
    run = Run(
        size, sha256_of(image), args.clients, args.rounds, args.workers, max_time, args.timeline
    )
    rows: list[dict[str, object]] = []
    skipped: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        rig = stack.enter_context(wan.WanRig())
        site = rig.add_host("o")
        origins = {"nginx": nginx_origin(stack, work, site, image, None)}
        if "per-connection-limit" in args.scenarios:
            quarter = int(er.link_rate(LINK_MBIT) / 4)
            origins["nginx-limited"] = nginx_origin(stack, work, site, image, quarter)
        site.shape(LINK_MBIT)
        if "glance-cache" in args.only and not GlancePeer.available():
            skipped["glance-cache"] = "the Glance peer is not installed (bench/setup.sh)"
        if "imagecache-glance" in args.only:
            if not GlancePeer.available():
                skipped["imagecache-glance"] = "the Glance peer is not installed (bench/setup.sh)"
            else:
                central = rig.add_host("g")
                print("starting the Glance peer in its namespace", flush=True)
                origins["glance"] = glance_origin(stack, work, central, image)
                central.shape(LINK_MBIT)
        print(f"link: {site.qdiscs()}", flush=True)
        for scenario in args.scenarios:
            print(f"{scenario}:", flush=True)
            for subject in args.only:
                if subject in skipped:
                    continue
                if subject == "imagecache-glance":
                    if scenario == "per-connection-limit":
                        continue  # the Glance peer has no per-connection limit
                    origin = origins["glance"]
                elif scenario == "per-connection-limit":
                    origin = origins["nginx-limited"]
                else:
                    origin = origins["nginx"]
                splits = [1]
                if scenario == "per-connection-limit" and subject == "imagecache":
                    splits += [args.segments] if args.segments > 1 else []
                    if args.segmented_only and len(splits) > 1:
                        splits = splits[1:]
                for segments in splits:
                    place = work / "subjects" / f"{scenario}-{subject}-{segments}"
                    try:
                        rows += one_subject(run, scenario, subject, origin, place, segments)
                    except PeerError as exc:
                        print(f"    {subject}: {exc}", flush=True)
                        skipped[f"{scenario}/{subject}/{segments}"] = str(exc)[-300:]
                    shutil.rmtree(place, ignore_errors=True)  # a cache of the image each
    return dict(
        size_mib=args.size_mib,
        image_bytes=size,
        clients=args.clients,
        rounds=args.rounds,
        link_mbit=LINK_MBIT,
        rtt_ms=2 * DELAY_S * 1000,
        bound_s=round(bound, 3),
        per_connection_limit_mbit=LINK_MBIT / 4,
        skipped=skipped,
        rows=rows,
        verdicts=er.verdicts(rows, "imagecache"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048, help="the image (2 GiB)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="of each edge subject")
    parser.add_argument("--only", default="all", help=f"subjects: {','.join(SUBJECTS)}")
    parser.add_argument("--scenarios", default="all", help=f"of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--segments",
        type=int,
        default=1,
        help="per-connection-limit: also run imagecache with fill_segments = N (N > 1)",
    )
    parser.add_argument(
        "--segmented-only",
        action="store_true",
        help="per-connection-limit: with --segments N, skip imagecache's one-connection run",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory")
    parser.add_argument(
        "--timeline",
        type=Path,
        help="write each round's relay samples, clients and the subject's log here",
    )
    args = parser.parse_args(argv)
    try:
        args.only = er.parse_names(args.only, SUBJECTS, "subject")
        args.scenarios = er.parse_names(args.scenarios, SCENARIOS, "scenario")
    except ValueError as exc:
        parser.error(str(exc))
    if not 1 <= args.clients <= 500 or not 1 <= args.rounds <= 20 or args.size_mib < 1:
        parser.error("--clients 1-500, --rounds 1-20, --size-mib ≥ 1")
    if not 1 <= args.segments <= 64:
        parser.error("--segments 1-64 (imagecache's fill_segments)")
    reason = wan.unavailable_reason()
    if reason is not None:
        print(f"WAN RIG UNAVAILABLE: {reason}", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C: every `with` above stops what it started.
    # SIGINT too, explicitly: a run started in the background of a script
    # inherits SIGINT ignored, and then Ctrl-C's stand-in would do nothing.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(
        f"edge boot storm: {args.size_mib} MiB image, {args.clients} clients, "
        f"{args.rounds} round(s), link {LINK_MBIT:g} Mbit/s, RTT {2 * DELAY_S * 1000:g} ms, "
        f"bound {er.physical_bound(args.size_mib * er.MIB, LINK_MBIT):.2f} s",
        flush=True,
    )
    with contextlib.ExitStack() as cleanup:
        if args.workdir is None:
            work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="edge-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        result = storm(args, work)
    result["command"] = " ".join(["bench/edge.py", *(argv or sys.argv[1:])])
    print()
    print(
        f"{result['size_mib']} MiB image, {result['clients']} clients, "
        f"link {LINK_MBIT:g} Mbit/s / {result['rtt_ms']:g} ms RTT, bound {result['bound_s']} s"
    )
    for line in er.table(result["rows"]):  # type: ignore[arg-type]
        print(line)
    for what, why in dict(result["skipped"]).items():  # type: ignore[call-overload]
        print(f"not run: {what}: {why}")
    print("imagecache against the issue's targets:")
    for line in result["verdicts"]:  # type: ignore[attr-defined]
        print(f"  {line}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
