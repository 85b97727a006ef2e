"""imagecache against its peers, in one run: `make bench` (DESIGN §12).

These machines are shared and noisy, so every number is reported next to a peer
measured minutes apart in the same run, and the verdicts are ratios:

a. hit   — a cached GET of one large image: imagecache vs nginx (sendfile) on the
           same file, and vs Glance's own cache hit; 1 client and ``--clients``.
b. miss  — a fill with verification vs a plain pass-through of the same origin,
           bounded by the hash rate (sha512 measured here); vs a client that
           verifies what that pass-through sends, in the same round (the bound
           measured rather than computed: bench/verifying_client.py); and vs
           Glance's miss. Each fill runs twice a round: once right after memory
           was recycled (a node in service, memory full of page cache: the
           target's case) and once on cold memory (an idle VM: reported too;
           see measure.recycle_memory).
c. herd  — 32 clients on one cold image: how many body reads the origin served
           (its access log; must be 1) and the aggregate throughput.
d. memory — 100 concurrent downloads of the large image starting cold: the
           imagecache processes' RSS sampled from start to end.
e. metadata — bench/metadata.py (the sqlite driver), run as is; --no-metadata skips it.
f. proxies — imagecache (http upstream), nginx, Varnish and Traffic Server in front
           of the same nginx origin: hits at 1, 4 and 16 clients, a 32-client cold
           herd, a single cold miss; MiB/s, time to first byte, CPU-s per GiB of each
           server's own processes, origin reads (bench/proxies.py has the method).
           ``--only proxies`` runs these five (proxy-hit1, proxy-hit4, proxy-hit16,
           proxy-herd, proxy-miss), which also take names one by one.

Upstreams: ``directory:`` (always), ``http:`` in front of an nginx origin, and
``glance:`` in front of a plain Glance (when the Glance peer is installed).

    .venv/bin/python bench/run.py            # 1 GiB image, 20-35 minutes on 2 cores (f: 12-25)
    .venv/bin/python bench/run.py --quick    # 256 MiB, fewer rounds: a sanity run
    .venv/bin/python bench/run.py --only proxies --publish docs/results/latest.json

Results: a table on stdout, and bench/results/run-<time>.{json,md}; ``--publish PATH``
also copies the JSON to PATH, which bench/plot.py draws (see bench/README.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import (
    MIB,
    ProcessSampler,
    Sample,
    Throughput,
    fetch_all,
    fetch_verified,
    hash_sample,
    hash_write_sample,
    recycle_memory,
)
from peers import (
    REPO,
    GlancePeer,
    Imagecache,
    Nginx,
    PeerError,
    TrafficServer,
    Varnish,
    file_digests,
    settle_fill,
    wait_until,
    write_random_file,
)
from proxies import (
    ATS,
    IMAGECACHE,
    NGINX,
    PROXY_SCENARIOS,
    VARNISH,
    ColdImages,
    ProxySubject,
    markdown_table,
    measured_round,
    print_entry,
    ratios,
    summary,
)

RESULTS = REPO / "bench" / "results"
SCENARIOS = ("hit", "miss", "herd", "memory", "metadata", *PROXY_SCENARIOS)
# --only names that stand for several scenarios.
ALIASES = {"proxies": tuple(PROXY_SCENARIOS)}


@dataclass(frozen=True)
class Config:
    size: int
    reps: int
    clients: int
    herd: int
    crowd: int
    workers: int
    glance: bool
    workdir: Path
    keep: bool
    metadata: bool
    only: frozenset[str]
    fill_hash_nice: int | None
    proxy_reps: int
    varnish: bool
    ats: bool
    ats_cold: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        size_mib = args.size_mib or (256 if args.quick else 1024)
        only: set[str] = set()
        for name in args.only.split(","):
            only.update(ALIASES.get(name, (name,)))
        return cls(
            size=size_mib * MIB,
            reps=args.reps or (3 if args.quick else 5),
            clients=args.clients,
            herd=32,
            crowd=100,
            workers=args.workers,
            glance=not args.no_glance and GlancePeer.available(),
            workdir=Path(args.workdir),
            keep=args.keep,
            metadata=not args.no_metadata,
            only=frozenset(only),
            fill_hash_nice=args.fill_hash_nice,
            # Three rounds (the protocol): a 32-client herd of a 1 GiB
            # image is 32 GiB a subject a round. An explicit --reps rules both.
            proxy_reps=args.proxy_reps or args.reps or 3,
            varnish=Varnish.available(),
            ats=TrafficServer.available(),
            ats_cold=args.ats_cold,
        )


@dataclass
class Report:
    """Everything measured: raw rows, ratios against targets, notes."""

    started: str
    machine: dict[str, str]
    config: dict[str, object]
    rows: list[dict[str, object]] = field(default_factory=list)
    ratios: list[dict[str, object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: str = ""
    # The proxy scenarios, one entry per scenario and subject (proxies.summary).
    proxies: list[dict[str, object]] = field(default_factory=list)

    def row(
        self, scenario: str, subject: str, result: Throughput | float, unit: str = "MiB/s"
    ) -> float:
        low = high = None
        rounds, errors = 1, 0
        if isinstance(result, Throughput):
            value = result.median
            low, high = (round(v, 1) for v in result.spread)
            rounds, errors = len(result.samples), result.errors
        else:
            value = result
        self.rows.append(
            dict(
                scenario=scenario,
                subject=subject,
                value=round(value, 1),
                unit=unit,
                low=low,
                high=high,
                rounds=rounds,
                errors=errors,
            )
        )
        print(f"  {scenario:<6} {subject:<58} {value:>9.1f} {unit}", flush=True)
        return value

    def ratio(
        self, name: str, num: Throughput, den: list[float] | Throughput, target: float | None
    ) -> None:
        """The median of per-round ratios: round i of ``num`` against round i of ``den``.

        Rounds of all subjects are interleaved, so a noisy moment of the shared
        machine hits both sides of one ratio alike.
        """
        dens = den if isinstance(den, list) else [x.mib_s for x in den.samples]
        per_round = [n.mib_s / d for n, d in zip(num.samples, dens, strict=True) if d > 0]
        value = statistics.median(per_round) if per_round else 0.0
        verdict = "" if target is None else ("ok" if value >= target else "MISSED")
        self.ratios.append(
            dict(
                name=name,
                ratio=round(value, 3),
                target=target,
                verdict=verdict,
                rounds=[round(r, 3) for r in per_round],
            )
        )

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def machine() -> dict[str, str]:
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "varnish": Varnish.version() if Varnish.available() else "",
        "trafficserver": TrafficServer.version() if TrafficServer.available() else "",
    }


# ----------------------------------------------------------------- setup ---


@dataclass
class Image:
    image_id: str
    path: Path
    size: int
    md5: str
    sha512: str


def make_image(images: Path, size: int) -> Image:
    """A random image with the sidecar digests the directory upstream reads."""
    image_id = str(uuid.uuid4())
    path = images / image_id
    write_random_file(path, size)
    md5, sha512 = file_digests(path)
    (images / f"{image_id}.md5").write_text(md5 + "\n")
    (images / f"{image_id}.sha512").write_text(sha512 + "\n")
    return Image(image_id, path, size, md5, sha512)


def warm(url: str, size: int) -> None:
    """One full GET (fills a cache); any error here means the peer is broken."""
    sample = fetch_all([url], size)
    if sample.errors:
        raise PeerError(f"warm-up GET {url} failed")


# ------------------------------------------------------------- scenarios ---


Subject = Callable[[], Sample]


def download(
    url: str | Callable[[], str], size: int, clients: int, before: Callable[[], None] | None = None
) -> Subject:
    """A subject that downloads ``url`` with ``clients`` clients (after ``before``)."""

    def one_round() -> Sample:
        if before is not None:
            before()
        return fetch_all([url if isinstance(url, str) else url()] * clients, size)

    return one_round


def interleaved(subjects: dict[str, Subject], rounds: int) -> dict[str, Throughput]:
    """``rounds`` rounds; every round runs every subject once, in a rotating order."""
    names = list(subjects)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            # The last fill's pages may still be going to disk: each subject
            # starts on a quiet disk instead of sharing the CPUs with that.
            os.sync()
            samples[name].append(subjects[name]())
    return {name: Throughput(got) for name, got in samples.items()}


def scenario_hit(
    cfg: Config,
    rep: Report,
    targets: dict[str, Callable[[], str]],
    nginx_url: str,
    nginx_copy_url: str,
) -> None:
    """a. a cached GET through each server, against nginx serving the file with sendfile."""
    for clients in (1, cfg.clients):
        rounds = cfg.reps if clients == 1 else max(2, cfg.reps - 2)
        print(f"a. hit: {cfg.size // MIB} MiB, {clients} client(s), {rounds} rounds", flush=True)
        subjects = {
            "nginx sendfile": download(nginx_url, cfg.size, clients),
            "nginx without sendfile (context)": download(nginx_copy_url, cfg.size, clients),
        }
        for name, url in targets.items():
            subjects[name] = download(url, cfg.size, clients)
        got = interleaved(subjects, rounds)
        for name, result in got.items():
            rep.row("hit", f"{name}, {clients} client(s)", result)
        base, copy = got["nginx sendfile"], got["nginx without sendfile (context)"]
        for name in targets:
            ours = name.startswith("imagecache")
            rep.ratio(
                f"hit {name} / nginx sendfile, {clients} client(s)",
                got[name],
                base,
                0.9 if ours else None,
            )
            if ours:
                rep.ratio(
                    f"hit {name} / nginx without sendfile, {clients} client(s)",
                    got[name],
                    copy,
                    None,
                )


def service_config(cfg: Config, name: str, **values: str) -> tuple[str, ...]:
    """``--config FILE`` for one service: ``values`` (TOML literals) and the run's own settings."""
    if cfg.fill_hash_nice is not None:
        values["fill_hash_nice"] = str(cfg.fill_hash_nice)
    path = cfg.workdir / f"ic-{name}.toml"
    path.write_text("".join(f"{key} = {value}\n" for key, value in values.items()))
    return ("--config", str(path))


@dataclass(frozen=True)
class MissCase:
    """One upstream kind's miss and the pass-through of the same origin."""

    name: str
    url: str
    evict: Callable[[], None]
    passthrough_url: str


def scenario_miss(
    cfg: Config,
    rep: Report,
    cases: list[MissCase],
    glance_miss: Subject | None,
    sha512: str,
) -> None:
    """b. verified fills against the pass-through of their origin, the hash rate, Glance."""
    print(
        f"b. miss: {cfg.size // MIB} MiB, {cfg.reps} rounds, cache emptied before each", flush=True
    )
    buffer = os.urandom(cfg.size)
    subjects: dict[str, Subject] = {
        "hashlib.sha512 over one buffer": lambda: hash_sample("sha512", buffer),
        "write to a file (one thread)": lambda: hash_write_sample(
            None, buffer, cfg.workdir / "hash-write.bin"
        ),
        "sha512 + write to a file (one thread)": lambda: hash_write_sample(
            "sha512", buffer, cfg.workdir / "hash-write.bin"
        ),
    }
    scratch = cfg.workdir / "recycle.bin"
    for case in cases:

        def recycled(evict: Callable[[], None] = case.evict) -> None:
            evict()
            recycle_memory(scratch, cfg.size)

        subjects[f"{case.name} miss (fill + verify)"] = download(case.url, cfg.size, 1, recycled)
        subjects[f"{case.name} miss, cold memory"] = download(case.url, cfg.size, 1, case.evict)
        subjects[f"pass-through of its origin ({case.name})"] = download(
            case.passthrough_url, cfg.size, 1
        )
        verifying = f"verifying client of the pass-through ({case.name})"
        subjects[verifying] = functools.partial(
            fetch_verified, case.passthrough_url, cfg.size, sha512
        )
    if glance_miss is not None:
        subjects["Glance's own miss (cache on, emptied)"] = glance_miss
    got = interleaved(subjects, cfg.reps)
    for name, result in got.items():
        rep.row("miss", name, result)
    hashing = [x.mib_s for x in got["hashlib.sha512 over one buffer"].samples]
    for case in cases:
        fill = got[f"{case.name} miss (fill + verify)"]
        plain = [x.mib_s for x in got[f"pass-through of its origin ({case.name})"].samples]
        limit = [min(p, h) for p, h in zip(plain, hashing, strict=True)]
        rep.ratio(f"miss {case.name} / min(pass-through, sha512 rate)", fill, limit, 0.8)
        rep.ratio(
            f"miss {case.name}, cold memory / min(pass-through, sha512 rate)",
            got[f"{case.name} miss, cold memory"],
            limit,
            None,
        )
        rep.ratio(f"miss {case.name} / pass-through", fill, plain, None)
        # The same bound measured instead of computed: a client verifying what
        # the pass-through sends, in the same round (see fetch_verified).
        rep.ratio(
            f"miss {case.name} / verifying pass-through (same round)",
            fill,
            got[f"verifying client of the pass-through ({case.name})"],
            None,
        )
        # The fill also writes every byte to the cache file; on these VMs the
        # page-cache write rate is often below the hash rate.
        writing = [x.mib_s for x in got["write to a file (one thread)"].samples]
        rep.ratio(
            f"miss {case.name} / min(pass-through, sha512, file write)",
            fill,
            [min(lim, w) for lim, w in zip(limit, writing, strict=True)],
            None,
        )
        rep.ratio(
            f"miss {case.name} / (sha512 + write, one thread)",
            fill,
            got["sha512 + write to a file (one thread)"],
            None,
        )
        if glance_miss is not None:
            rep.ratio(
                f"miss {case.name} / Glance's own miss",
                fill,
                got["Glance's own miss (cache on, emptied)"],
                None,
            )


def scenario_herd(
    cfg: Config,
    rep: Report,
    subject: str,
    url: str,
    evict: Callable[[], None],
    body_reads: Callable[[], int],
    metadata_reads: Callable[[], int] | None = None,
) -> None:
    """c. many clients on one cold image: one origin read, aggregate throughput.

    ``metadata_reads``, where the origin's log shows them: the herd's metadata
    reads too, at most 1 (0 when an earlier scenario's answer is still
    remembered, ``metadata_cache_ttl``).
    """
    evict()
    before = body_reads()
    heads_before = metadata_reads() if metadata_reads is not None else 0
    sample = fetch_all([url] * cfg.herd, cfg.size)
    # The origin logs a request when its response ends, which precedes the
    # fill's commit; poll briefly in case the log line lands a moment later.
    with contextlib.suppress(PeerError):
        wait_until("origin log", lambda: body_reads() > before, timeout=5)
    reads = body_reads() - before
    rep.row("herd", f"{subject}: {cfg.herd} cold clients, aggregate", Throughput([sample]))
    rep.row("herd", f"{subject}: origin body reads (must be 1)", float(reads), "reads")
    if metadata_reads is not None:
        heads = metadata_reads() - heads_before
        rep.row("herd", f"{subject}: origin metadata reads (at most 1)", float(heads), "reads")
        rep.ratios.append(
            dict(
                name=f"herd {subject}: origin metadata reads",
                ratio=heads,
                target=1,
                verdict="ok" if heads <= 1 else "MISSED",
            )
        )
    rep.ratios.append(
        dict(
            name=f"herd {subject}: origin body reads",
            ratio=reads,
            target=1,
            verdict="ok" if reads == 1 else "MISSED",
        )
    )
    if sample.errors:
        rep.note(f"herd {subject}: {sample.errors} of {cfg.herd} downloads failed")


def scenario_memory(cfg: Config, rep: Report, ic: Imagecache, image: Image) -> None:
    """d. RSS of the imagecache processes under 100 concurrent downloads, from cold."""
    ic.evict(image.image_id)
    start_rss = ic.rss_kib()
    with ProcessSampler(lambda: (ic.rss_kib(), ic.fds())) as sampler:
        sample = fetch_all([ic.file_url(image.image_id)] * cfg.crowd, cfg.size)
    peak = max(sampler.rss_kib)
    rep.row("memory", f"{cfg.crowd} concurrent downloads, aggregate", Throughput([sample]))
    rep.row("memory", "imagecache RSS at start (all processes)", start_rss / 1024, "MiB")
    rep.row("memory", "imagecache RSS peak (sampled every 0.1 s)", peak / 1024, "MiB")
    rep.row("memory", "imagecache RSS at end", sampler.rss_kib[-1] / 1024, "MiB")
    rep.row("memory", "imagecache VmHWM (kernel's peak, all processes)", ic.hwm_kib() / 1024, "MiB")
    rep.row("memory", "open fds: start / peak / end", float(max(sampler.fds)), "fds")
    rep.note(f"fds start {sampler.fds[0]}, peak {max(sampler.fds)}, end {sampler.fds[-1]}")
    growth = (peak - start_rss) / 1024
    rep.ratios.append(
        dict(
            name=f"memory: RSS growth under {cfg.crowd} downloads (MiB)",
            ratio=round(growth, 1),
            target=None,
            verdict=f"{growth / (cfg.size / MIB) * 100:.1f}% of one image",
        )
    )
    if sample.errors:
        rep.note(f"memory: {sample.errors} of {cfg.crowd} downloads failed")


def scenario_proxies(
    cfg: Config,
    rep: Report,
    subjects: list[ProxySubject],
    cold: ColdImages,
    image_id: str,
    origin: Nginx,
) -> None:
    """f. imagecache, nginx, Varnish and Traffic Server, warm and cold, interleaved by round."""
    chosen = [name for name in PROXY_SCENARIOS if name in cfg.only]
    if any(not PROXY_SCENARIOS[name][1] for name in chosen):
        for subject in subjects:
            warm(subject.url_for(image_id), cfg.size)
            subject.settle(image_id)
    got: dict[str, dict[str, list[Sample]]] = {}
    for scenario in chosen:
        clients, is_cold = PROXY_SCENARIOS[scenario]
        print(
            f"f. {scenario}: {cfg.size // MIB} MiB, {clients} client(s), "
            f"{'a new image each round' if is_cold else 'warm'}, {cfg.proxy_reps} rounds",
            flush=True,
        )
        rounds: dict[str, Subject] = {
            subject.name: functools.partial(
                measured_round,
                subject,
                cold.fresh if is_cold else lambda: image_id,
                clients,
                cfg.size,
                is_cold,
                lambda iid: origin.requests_for(f"/{iid}"),
            )
            for subject in subjects
            if not (is_cold and subject.name == ATS and not cfg.ats_cold)
        }
        if is_cold and ATS in {subject.name for subject in subjects} and not cfg.ats_cold:
            rep.note(f"{scenario}: Traffic Server left out of the cold rounds (see --ats-cold)")
        results = interleaved(rounds, cfg.proxy_reps)
        got[scenario] = {name: result.samples for name, result in results.items()}
        for subject in subjects:
            if subject.name not in got[scenario]:
                continue
            entry = summary(scenario, clients, subject, got[scenario][subject.name])
            rep.proxies.append(entry)
            print_entry(entry)
            if entry["errors"]:
                rep.note(f"{scenario} {subject.name}: {entry['errors']} downloads failed")
    rep.ratios.extend(ratios(got))


def proxy_subjects(
    cfg: Config, enter: Callable[[Any], Any], origin: Nginx, ic_http: Imagecache
) -> list[ProxySubject]:
    """The proxy scenarios' servers: imagecache and nginx, and Varnish and ATS where installed."""
    subjects = [
        ProxySubject(
            IMAGECACHE,
            f"imagecache (http upstream, {cfg.workers} workers)",
            ic_http.file_url,
            ic_http.pids,
            settle=lambda iid: settle_fill(ic_http.cache_dir, iid),
            cleanup=ic_http.evict,
        ),
        ProxySubject(
            NGINX,
            f"nginx sendfile (the origin itself, {cfg.workers} workers)",
            lambda iid: f"{origin.url}/{iid}",
            origin.pids,
            counts_origin=False,
        ),
    ]
    if cfg.varnish:
        # Room for the warm image and one cold one (each purged after its round).
        varnish: Varnish = enter(
            Varnish(cfg.workdir / "varnish", origin.url, 2 * cfg.size + 256 * MIB)
        )
        subjects.append(
            ProxySubject(
                VARNISH,
                f"{Varnish.version() or 'Varnish'} (malloc, streaming)",
                lambda iid: f"{varnish.url}/{iid}",
                varnish.pids,
                cleanup=lambda iid: varnish.purge(f"/{iid}"),
            )
        )
    else:
        print("  note: varnishd not installed (bench/setup.sh): no Varnish", flush=True)
    if cfg.ats:
        # Room for the warm image and a few cold ones (each purged after its round;
        # the cache file is cyclic anyway).
        ats: TrafficServer = enter(
            TrafficServer(
                cfg.workdir / "trafficserver",
                origin.url,
                max(4 * cfg.size, 512 * MIB),
                threads=cfg.workers,
            )
        )
        subjects.append(
            ProxySubject(
                ATS,
                f"{TrafficServer.version() or 'Traffic Server'} (read-while-writer, "
                f"{cfg.workers} threads)",
                lambda iid: f"{ats.url}/{iid}",
                ats.pids,
                cleanup=lambda iid: ats.purge(f"/{iid}"),
            )
        )
    else:
        print(
            "  note: traffic_server not installed (bench/setup.sh): no Traffic Server", flush=True
        )
    return subjects


# ----------------------------------------------------------------- main ---


def run(cfg: Config) -> Report:
    rep = Report(
        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=machine(),
        config={k: str(v) for k, v in asdict(cfg).items()},
    )
    print(
        f"imagecache bench: {cfg.size // MIB} MiB image, {cfg.workers} worker(s), "
        f"glance={'yes' if cfg.glance else 'no (peer not installed or --no-glance)'}, "
        f"varnish={'yes' if cfg.varnish else 'no'}, traffic server={'yes' if cfg.ats else 'no'}",
        flush=True,
    )
    if cfg.workdir.exists():
        shutil.rmtree(cfg.workdir)
    images = cfg.workdir / "images"
    image = make_image(images, cfg.size)

    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        origin = enter(
            Nginx(
                cfg.workdir / "nginx-origin",
                root=images,
                workers=cfg.workers,
                access_log=True,
                md5_headers={image.image_id: image.md5},
            )
        )
        origin_copy = enter(
            Nginx(cfg.workdir / "nginx-copy", root=images, workers=cfg.workers, sendfile=False)
        )
        origin_proxy = enter(
            Nginx(cfg.workdir / "nginx-proxy", proxy_to=origin.url, workers=cfg.workers)
        )
        ic_dir = enter(
            Imagecache(
                cfg.workdir / "ic-dir" / "cache",
                f"directory:{images}",
                workers=cfg.workers,
                extra_args=service_config(cfg, "dir"),
            )
        )
        # The http origin offers the same sha512 sidecar the directory one has
        # (besides nginx's Content-MD5), so every miss verifies sha512 and the
        # sha512 rate is each one's bound. Without it the fill would check md5,
        # which on some of these CPUs is the slower hash (821 vs 1,100 MiB/s).
        ic_http = enter(
            Imagecache(
                cfg.workdir / "ic-http" / "cache",
                f"http:{origin.url}/{{image_id}}",
                workers=cfg.workers,
                extra_args=service_config(cfg, "http", http_checksum_sidecar="true"),
            )
        )
        file_path = f"/{image.image_id}"
        hit_targets: dict[str, Callable[[], str]] = {
            "imagecache (directory upstream)": lambda: ic_dir.file_url(image.image_id),
            "imagecache (http upstream)": lambda: ic_http.file_url(image.image_id),
        }
        glance_cache = glance_origin = ic_glance = glance_proxy = None
        gid = gid_cache = ""
        # Only the hit, miss and herd scenarios have Glance subjects.
        if cfg.glance and cfg.only & {"hit", "miss", "herd"}:
            glance_cache = enter(GlancePeer(cfg.workdir / "glance-cache", cache=True))
            glance_origin = enter(GlancePeer(cfg.workdir / "glance-origin", cache=False))
            print("  uploading the image to two Glance peers (cache on / plain origin)", flush=True)
            with concurrent.futures.ThreadPoolExecutor(2) as uploads:
                origin_upload = uploads.submit(glance_origin.upload, image.path, "bench-origin")
                cache_upload = uploads.submit(glance_cache.upload, image.path, "bench-cache")
                gid, gid_cache = origin_upload.result(), cache_upload.result()
            ic_glance = enter(
                Imagecache(
                    cfg.workdir / "ic-glance" / "cache",
                    f"glance:{glance_origin.url}",
                    workers=cfg.workers,
                    extra_args=service_config(cfg, "glance"),
                )
            )
            glance_proxy = enter(
                Nginx(cfg.workdir / "glance-proxy", proxy_to=glance_origin.url, workers=cfg.workers)
            )
            glance_cache.fill_cache(gid_cache)
            hit_targets["imagecache (glance upstream)"] = lambda: ic_glance.file_url(gid)
            hit_targets["Glance's own cache"] = lambda: glance_cache.file_url(gid_cache)

        for name, url in hit_targets.items():
            if name.startswith("imagecache"):
                warm(url(), cfg.size)

        def run_herds() -> None:
            print(f"c. herd: {cfg.herd} concurrent clients on one cold image", flush=True)
            scenario_herd(
                cfg,
                rep,
                "http upstream (nginx origin)",
                ic_http.file_url(image.image_id),
                lambda: ic_http.evict(image.image_id),
                lambda: origin.requests_for(file_path),
                lambda: origin.heads_for(file_path),
            )
            if ic_glance is not None and glance_origin is not None:
                scenario_herd(
                    cfg,
                    rep,
                    "glance upstream (Glance origin)",
                    ic_glance.file_url(gid),
                    lambda: ic_glance.evict(gid),
                    lambda: glance_origin.body_reads(gid),
                )

        if "hit" in cfg.only:
            scenario_hit(cfg, rep, hit_targets, origin.url + file_path, origin_copy.url + file_path)

        cases = [
            MissCase(
                "imagecache (directory upstream)",
                ic_dir.file_url(image.image_id),
                lambda: ic_dir.evict(image.image_id),
                origin.url + file_path,
            ),
            MissCase(
                "imagecache (http upstream)",
                ic_http.file_url(image.image_id),
                lambda: ic_http.evict(image.image_id),
                origin_proxy.url + file_path,
            ),
        ]
        glance_miss = None
        if ic_glance is not None and glance_proxy is not None and glance_cache is not None:
            cases.append(
                MissCase(
                    "imagecache (glance upstream)",
                    ic_glance.file_url(gid),
                    lambda: ic_glance.evict(gid),
                    glance_proxy.url + f"/v2/images/{gid}/file",
                )
            )
            cache_peer = glance_cache
            glance_miss = download(
                lambda: cache_peer.file_url(gid_cache),
                cfg.size,
                1,
                lambda: cache_peer.evict(gid_cache),
            )
        if "miss" in cfg.only:
            scenario_miss(cfg, rep, cases, glance_miss, image.sha512)

        if "herd" in cfg.only:
            run_herds()

        if "memory" in cfg.only:
            print(f"d. memory: {cfg.crowd} concurrent downloads, starting cold", flush=True)
            scenario_memory(cfg, rep, ic_dir, image)

        if cfg.only & set(PROXY_SCENARIOS):
            subjects = proxy_subjects(cfg, enter, origin, ic_http)
            cold = ColdImages(images, image.path, image.md5, image.sha512)
            scenario_proxies(cfg, rep, subjects, cold, image.image_id, origin)

    if not cfg.keep:
        shutil.rmtree(cfg.workdir, ignore_errors=True)
    if cfg.metadata and "metadata" in cfg.only:
        scenario_metadata(rep)
    return rep


def scenario_metadata(rep: Report) -> None:
    """e. the sqlite driver's metadata speed: bench/metadata.py, run as it is (its own owner)."""
    print("e. metadata: bench/metadata.py", flush=True)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "metadata.py")],
        capture_output=True,
        text=True,
        check=False,
    )
    print(done.stdout, flush=True)
    rep.metadata = done.stdout.strip() or done.stderr.strip()[-2000:]
    if done.returncode != 0:
        rep.note(f"bench/metadata.py exited with {done.returncode}")


def markdown(rep: Report, command: str) -> str:
    lines = [
        f"Run {rep.started}: `{command}`",
        "",
        f"Machine: {rep.machine['nproc']} cores, kernel {rep.machine['kernel']}, "
        f"Python {rep.machine['python']}, {rep.machine['nginx']}"
        + "".join(f", {rep.machine[k]}" for k in ("varnish", "trafficserver") if rep.machine.get(k))
        + f"; CPU {rep.machine.get('cpu', '?')}.",
        "",
        "| ratio | value | target | verdict |",
        "| --- | ---: | ---: | --- |",
    ]
    for r in rep.ratios:
        target = "" if r["target"] is None else f"{r.get('op', '≥')} {r['target']}"
        if str(r["name"]).startswith("herd") and "op" not in r:
            target = "= 1"
        lines.append(f"| {r['name']} | {r['ratio']} | {target} | {r['verdict']} |")
    if rep.proxies:
        lines += ["", "Against the caching proxies (medians over rounds):", ""]
        lines += markdown_table(rep.proxies)
    if rep.rows:
        lines += [
            "",
            "| scenario | subject | median | min-max | rounds | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
    for r in rep.rows:
        spread = "" if r["low"] is None else f"{r['low']}-{r['high']}"
        lines.append(
            f"| {r['scenario']} | {r['subject']} | {r['value']} {r['unit']} | {spread} "
            f"| {r['rounds']} | {r['errors']} |"
        )
    if rep.notes:
        lines += ["", *[f"- {n}" for n in rep.notes]]
    if rep.metadata:
        lines += ["", "Metadata (bench/metadata.py):", "", "```", rep.metadata, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB image, 3 rounds")
    parser.add_argument("--size-mib", type=int, default=0, help="image size (default 1024)")
    parser.add_argument("--reps", type=int, default=0, help="rounds per measurement")
    parser.add_argument(
        "--proxy-reps",
        type=int,
        default=0,
        help="rounds of the proxy scenarios (default: --reps if given, else 3)",
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients in a (4-8)")
    parser.add_argument("--workers", type=int, default=2, help="imagecache and nginx workers")
    parser.add_argument("--no-glance", action="store_true", help="skip the Glance peers")
    parser.add_argument("--workdir", default="/var/tmp/imagecache-bench/run")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}; 'proxies' = all proxy-* "
        "(default: all)",
    )
    parser.add_argument(
        "--publish",
        metavar="PATH",
        help="also copy the results JSON to PATH (e.g. docs/results/latest.json)",
    )
    parser.add_argument(
        "--ats-cold",
        action="store_true",
        help="also run Traffic Server in the cold scenarios (herd, miss); off because with "
        "this bench's configuration its 32-client herd of a cold 1 GiB image left clients "
        "with no byte until curl's 600 s limit (2026-12-02, docs/benchmarks-log.md)",
    )
    parser.add_argument("--no-metadata", action="store_true", help="skip bench/metadata.py")
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    parser.add_argument(
        "--fill-hash-nice",
        type=int,
        default=None,
        help="run imagecache with this fill_hash_nice (default: its default, unset)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SCENARIOS) - set(ALIASES)
    if unknown:
        parser.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    cfg = Config.from_args(args)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rep = run(cfg)
    text = markdown(rep, command.strip())
    print()
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = rep.started.replace(":", "").replace("+0000", "Z")
    (RESULTS / f"run-{stamp}.json").write_text(json.dumps(asdict(rep), indent=2) + "\n")
    (RESULTS / f"run-{stamp}.md").write_text(text)
    print(f"written: {RESULTS}/run-{stamp}.{{json,md}}")
    if args.publish:
        published = Path(args.publish)
        published.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(RESULTS / f"run-{stamp}.json", published)
        print(f"published: {published} (draw it: .venv/bin/python bench/plot.py {published})")
    missed = [r for r in rep.ratios if r["verdict"] == "MISSED"]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
