"""imagecache against the caching proxies an operator would otherwise pick (bench/run.py).

Every subject serves the same image from the same nginx origin on loopback:

- imagecache, its http upstream in front of the origin (``--workers`` processes,
  verifying sha512 on a miss where the others verify nothing);
- nginx serving the file itself with sendfile: the baseline (it *is* the origin,
  so it has no miss; its "cold" rounds read a file it has not served before);
- Varnish (malloc storage, streaming, one backend fetch per object);
- Traffic Server (a cache file, read-while-writer).

Scenarios, by their ``--only`` names:

- ``proxy-hit1``, ``proxy-hit4``, ``proxy-hit16``: a warm cache, 1, 4 and 16 clients at once;
- ``proxy-herd``: 32 clients at once on an image the subject has never seen;
- ``proxy-miss``: one client on an image the subject has never seen.

Per round and subject: the aggregate MiB/s; each client's time to first byte
(curl's ``time_starttransfer``); the CPU time of the subject's whole process
tree (utime + stime of every process, all threads included, read from /proc
just before and just after the downloads), per GiB delivered; and for cold
rounds, the origin's full-body reads of that image (its access log).

A cold round gets an image name nobody has fetched: a hard link in the origin's
directory (the same inode, so every subject's origin read comes from the same
page cache) with its sidecar digests. Fresh names were chosen over purging
because they make every subject cold the same way, with no purge API to trust
per peer. After the round (not measured) each cache drops that image
(imagecache's DELETE, PURGE for Varnish and Traffic Server), so a 1 GiB run
needs room for two images in each, and no cache evicts in the middle of a fill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from measure import Sample, fetch_all
from peers import PeerError, cpu_seconds_between, cpu_ticks, wait_until

# name -> (clients, cold)
PROXY_SCENARIOS: dict[str, tuple[int, bool]] = {
    "proxy-hit1": (1, False),
    "proxy-hit4": (4, False),
    "proxy-hit16": (16, False),
    "proxy-herd": (32, True),
    "proxy-miss": (1, True),
}
IMAGECACHE, NGINX, VARNISH, ATS = "imagecache", "nginx", "Varnish", "Traffic Server"
HERD_TTFB_TARGET = 0.05


def _nothing(image_id: str) -> None:
    return None


@dataclass(frozen=True)
class ProxySubject:
    """One server measured in the proxy scenarios."""

    name: str  # short: the plot's legend and the ratios
    label: str  # what exactly runs: the tables
    url_for: Callable[[str], str]  # image id -> its URL on this server
    pids: Callable[[], list[int]]  # the server's process tree, now
    # After a cold round's downloads, before the CPU reading: the fill is done.
    settle: Callable[[str], None] = _nothing
    # After a cold round, not measured: drop what it cached (disk space).
    cleanup: Callable[[str], None] = _nothing
    # False for nginx: it is the origin, its reads of itself say nothing.
    counts_origin: bool = True


@dataclass(frozen=True)
class ColdImages:
    """Makes images nobody has fetched yet: hard links of one image in the origin's directory."""

    images: Path
    source: Path
    md5: str
    sha512: str

    def fresh(self) -> str:
        image_id = str(uuid.uuid4())
        os.link(self.source, self.images / image_id)
        (self.images / f"{image_id}.md5").write_text(self.md5 + "\n")
        (self.images / f"{image_id}.sha512").write_text(self.sha512 + "\n")
        return image_id


def measured_round(
    subject: ProxySubject,
    image_id: Callable[[], str],
    clients: int,
    size: int,
    cold: bool,
    origin_reads: Callable[[str], int],
) -> Sample:
    """``clients`` downloads of one image from ``subject``, with its CPU time and TTFBs."""
    iid = image_id()
    url = subject.url_for(iid)
    counting = cold and subject.counts_origin
    reads_before = origin_reads(iid) if counting else 0
    before = cpu_ticks(subject.pids())
    sample = fetch_all([url] * clients, size)
    if cold:
        subject.settle(iid)
    after = cpu_ticks(subject.pids())
    reads = None
    if counting:
        # nginx logs a request when its response ends, which precedes the
        # clients' last byte; allow a moment for the line to land anyway.
        with contextlib.suppress(PeerError):
            wait_until("origin log", lambda: origin_reads(iid) > reads_before, timeout=5)
        reads = origin_reads(iid) - reads_before
    if cold:
        subject.cleanup(iid)
    return dataclasses.replace(sample, cpu_s=cpu_seconds_between(before, after), origin_reads=reads)


def summary(
    scenario: str, clients: int, subject: ProxySubject, samples: list[Sample]
) -> dict[str, object]:
    """One subject's rounds of one scenario: medians for the tables, every round for the record."""
    rates = [s.mib_s for s in samples]
    cpu = [c for s in samples if (c := s.cpu_s_per_gib) is not None]
    medians = [statistics.median(s.ttfb) for s in samples if s.ttfb]
    worst = [max(s.ttfb) for s in samples if s.ttfb]
    reads = [s.origin_reads for s in samples if s.origin_reads is not None]
    return dict(
        scenario=scenario,
        clients=clients,
        subject=subject.name,
        label=subject.label,
        mib_s=round(statistics.median(rates), 1),
        mib_s_low=round(min(rates), 1),
        mib_s_high=round(max(rates), 1),
        cpu_s_per_gib=round(statistics.median(cpu), 4) if cpu else None,
        ttfb_median=round(statistics.median(medians), 4) if medians else None,
        ttfb_worst=round(max(worst), 4) if worst else None,
        origin_reads_max=max(reads) if reads else None,
        errors=sum(s.errors for s in samples),
        rounds=[
            dict(
                mib_s=round(s.mib_s, 1),
                seconds=round(s.seconds, 3),
                bytes=s.total_bytes,
                cpu_s=None if s.cpu_s is None else round(s.cpu_s, 3),
                ttfb=[round(t, 4) for t in s.ttfb],
                origin_reads=s.origin_reads,
                errors=s.errors,
            )
            for s in samples
        ],
    )


def _paired(
    name: str,
    num: list[float | None],
    den: list[float | None],
    target: float | None,
    op: str,
) -> dict[str, object]:
    """The median of per-round ratios (round i against round i: the same moment of the machine)."""
    per_round = [n / d for n, d in zip(num, den, strict=True) if n is not None and d]
    value = statistics.median(per_round) if per_round else float("nan")
    return _verdict(name, value, target, op, [round(r, 3) for r in per_round])


def _verdict(
    name: str, value: float, target: float | None, op: str, rounds: list[float]
) -> dict[str, object]:
    if target is None:
        verdict = ""
    elif value != value:  # NaN: nothing to compare
        verdict = "no data"
    else:
        ok = value >= target if op == "≥" else value <= target
        verdict = "ok" if ok else "MISSED"
    return dict(
        name=name, ratio=round(value, 3), target=target, op=op, verdict=verdict, rounds=rounds
    )


def ratios(got: dict[str, dict[str, list[Sample]]]) -> list[dict[str, object]]:
    """The issue's targets as ratios: imagecache against Varnish, nginx, and the herd's TTFB."""
    out: list[dict[str, object]] = []

    def rates(scenario: str, name: str) -> list[float | None]:
        return [s.mib_s for s in got[scenario][name]]

    def cpu(scenario: str, name: str) -> list[float | None]:
        return [s.cpu_s_per_gib for s in got[scenario][name]]

    def have(scenario: str, *names: str) -> bool:
        return scenario in got and all(n in got[scenario] for n in names)

    for scenario, clients in (("proxy-hit4", 4), ("proxy-hit16", 16)):
        if have(scenario, IMAGECACHE, VARNISH):
            out.append(
                _paired(
                    f"hit, {clients} clients: imagecache / Varnish throughput",
                    rates(scenario, IMAGECACHE),
                    rates(scenario, VARNISH),
                    1.0,
                    "≥",
                )
            )
            out.append(
                _paired(
                    f"hit, {clients} clients: imagecache / Varnish CPU-s per GiB",
                    cpu(scenario, IMAGECACHE),
                    cpu(scenario, VARNISH),
                    1.0,
                    "≤",
                )
            )
    if have("proxy-herd", IMAGECACHE, VARNISH):
        out.append(
            _paired(
                "herd of 32: imagecache / Varnish CPU-s per GiB",
                cpu("proxy-herd", IMAGECACHE),
                cpu("proxy-herd", VARNISH),
                1.0,
                "≤",
            )
        )
    if have("proxy-herd", IMAGECACHE):
        samples = got["proxy-herd"][IMAGECACHE]
        medians = [statistics.median(s.ttfb) for s in samples if s.ttfb]
        value = statistics.median(medians) if medians else float("nan")
        out.append(
            _verdict(
                "herd of 32: imagecache median time to first byte (s)",
                value,
                HERD_TTFB_TARGET,
                "≤",
                [round(m, 4) for m in medians],
            )
        )
        reads = [s.origin_reads or 0 for s in samples]
        out.append(
            dict(
                name="herd of 32: imagecache origin body reads (worst round)",
                ratio=max(reads),
                target=1,
                op="=",
                verdict="ok" if max(reads) == 1 else "MISSED",
                rounds=reads,
            )
        )
    if have("proxy-hit1", IMAGECACHE, NGINX):
        out.append(
            _paired(
                "hit, 1 client: imagecache / nginx sendfile throughput",
                rates("proxy-hit1", IMAGECACHE),
                rates("proxy-hit1", NGINX),
                1.0,
                "≥",
            )
        )
        peers = [n for n in got["proxy-hit1"] if n != IMAGECACHE]
        # The lowest peer's CPU per GiB, round by round.
        lowest: list[float | None] = []
        for i in range(len(got["proxy-hit1"][IMAGECACHE])):
            values = [c for n in peers if (c := got["proxy-hit1"][n][i].cpu_s_per_gib)]
            lowest.append(min(values) if values else None)
        out.append(
            _paired(
                "hit, 1 client: imagecache / lowest peer CPU-s per GiB",
                cpu("proxy-hit1", IMAGECACHE),
                lowest,
                1.0,
                "≤",
            )
        )
    return out


def markdown_table(entries: list[dict[str, object]]) -> list[str]:
    """The proxy scenarios as one Markdown table (medians over rounds)."""

    def num(value: object, fmt: str) -> str:
        return "" if value is None else format(value, fmt)

    lines = [
        "| scenario | subject | MiB/s (min-max) | CPU-s per GiB | TTFB median | TTFB worst "
        "| origin body reads | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in entries:
        lines.append(
            f"| {e['scenario']} ({e['clients']}) | {e['label']} | {e['mib_s']} "
            f"({e['mib_s_low']}-{e['mib_s_high']}) | {num(e['cpu_s_per_gib'], '.3f')} "
            f"| {num(e['ttfb_median'], '.4f')} s | {num(e['ttfb_worst'], '.4f')} s "
            f"| {num(e['origin_reads_max'], 'd')} | {e['errors']} |"
        )
    return lines


def print_entry(e: dict[str, object]) -> None:
    cpu = e["cpu_s_per_gib"]
    ttfb = e["ttfb_median"]
    print(
        f"  {e['scenario']:<11} {e['subject']:<14} {e['mib_s']:>8} MiB/s"
        f"  {'-' if cpu is None else format(cpu, '.3f'):>6} CPU-s/GiB"
        f"  TTFB {'-' if ttfb is None else format(ttfb, '.4f')} s"
        + ("" if e["origin_reads_max"] is None else f"  origin reads {e['origin_reads_max']}"),
        flush=True,
    )
