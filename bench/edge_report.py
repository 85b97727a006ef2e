"""Pure helpers of bench/edge.py: client reports, origin logs, the physical bound, the table.

No processes, sockets or rig here, so tests/test_bench_edge.py can check the
arithmetic and the parsing without any load.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MIB = 1 << 20
# What a client's shell pipeline prints on stderr (curl's --write-out), one line.
CLIENT_MARK = "EDGE"
CLIENT_FORMAT = (
    "%{stderr}\\n" + CLIENT_MARK + " %{exitcode} %{http_code} %{size_download} "
    "%{time_starttransfer} %{time_total}\\n"
)
_SHA256 = re.compile(r"^([0-9a-f]{64})\b")
# nginx's combined log format: "METHOD PATH PROTO" STATUS BYTES
_ACCESS = re.compile(
    r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+)'
)


def link_rate(mbit: float) -> float:
    """Bytes per second of a link of ``mbit`` Mbit/s (10^6 bits, as tc counts)."""
    return mbit * 1_000_000 / 8


def physical_bound(size: int, mbit: float) -> float:
    """Seconds the image needs on the link at its full rate: no fill can end sooner."""
    return size / link_rate(mbit)


def parse_names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated choice of ``allowed`` names, in the order given ("all": every one)."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if words == ["all"]:
        return list(allowed)
    unknown = [w for w in words if w not in allowed]
    if unknown or not words:
        raise ValueError(f"unknown {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class ClientResult:
    """One client's download as its pipeline (curl | openssl dgst) reported it."""

    exit_code: int  # curl's; -1 when its line is missing (killed, timed out)
    status: int
    size: int
    ttfb: float | None
    seconds: float  # since the round started, when the pipeline ended
    sha256: str
    error: str = ""

    def ok(self, size: int, sha256: str) -> bool:
        return (
            self.exit_code == 0
            and self.status == 200
            and self.size == size
            and self.sha256 == sha256
        )


def parse_client(stdout: str, stderr: str, seconds: float) -> ClientResult:
    """The result of one client from its pipeline's output (see ``CLIENT_FORMAT``)."""
    found = _SHA256.match(stdout.strip())
    digest = found.group(1) if found else ""
    report: list[str] = []
    other: list[str] = []
    for line in stderr.splitlines():
        if line.startswith(CLIENT_MARK + " "):
            report = line.split()[1:]
        elif line.strip():
            other.append(line.strip())
    error = " ".join(other)[-200:]
    if len(report) < 5:
        return ClientResult(-1, 0, 0, None, seconds, digest, error or "no report from curl")
    code, status, size, ttfb, _total = report[:5]
    return ClientResult(int(code), int(status), int(size), float(ttfb), seconds, digest, error)


@dataclass
class OriginCounts:
    """An origin's access log lines for one image: body reads and the metadata around them."""

    full_gets: int = 0  # GET answered 200
    range_gets: int = 0  # GET answered 206 with more than one byte
    # HEADs, sidecars, image records, and 1-byte Range GETs (the glance
    # upstream's access check): every request about the image that is not body
    metadata: int = 0
    body_bytes: int = 0  # body bytes the origin says it sent for the GETs
    statuses: dict[str, int] = field(default_factory=dict)


def origin_counts(lines: Iterable[str], body_path: str, prefix: str) -> OriginCounts:
    """Count the log lines of ``body_path`` (the image's bytes) and others under ``prefix``."""
    counts = OriginCounts()
    for line in lines:
        found = _ACCESS.search(line)
        if found is None or not found["path"].startswith(prefix):
            continue
        status = found["status"]
        path = found["path"].split("?", 1)[0]
        if found["method"] == "GET" and path == body_path:
            sent = int(found["bytes"])
            counts.statuses[status] = counts.statuses.get(status, 0) + 1
            counts.body_bytes += sent
            if status == "200":
                counts.full_gets += 1
            elif status == "206" and sent > 1:
                counts.range_gets += 1
            else:
                counts.metadata += 1
        else:
            counts.metadata += 1
    return counts


def summarise(
    *,
    scenario: str,
    subject: str,
    size: int,
    mbit: float,
    sha256: str,
    clients: Sequence[ClientResult],
    link_down: int,
    link_up: int,
    wire_down: int | None,
    resets: int,
    origin: OriginCounts,
    notes: Sequence[str] = (),
) -> dict[str, object]:
    """One round of one subject as the JSON record and the table row use it."""
    good = [c for c in clients if c.ok(size, sha256)]
    bound = physical_bound(size, mbit)
    last_ok = max((c.seconds for c in good), default=None)
    last_any = max((c.seconds for c in clients), default=None)
    ttfbs = sorted(c.ttfb for c in good if c.ttfb is not None)
    failures: dict[str, int] = {}
    for c in clients:
        if not c.ok(size, sha256):
            why = f"curl exit {c.exit_code}, HTTP {c.status}, {c.size} B" + (
                "" if c.size != size or not c.sha256 else ", wrong sha256"
            )
            failures[why] = failures.get(why, 0) + 1
    rate = size / last_ok if last_ok else None
    return dict(
        scenario=scenario,
        subject=subject,
        image_bytes=size,
        link_mbit=mbit,
        clients=len(clients),
        clients_ok=len(good),
        failures=failures,
        link_down_bytes=link_down,
        link_up_bytes=link_up,
        link_ratio=round(link_down / size, 4),
        wire_down_bytes=wire_down,
        wire_ratio=None if wire_down is None else round(wire_down / size, 4),
        bound_s=round(bound, 3),
        last_client_s=None if last_ok is None else round(last_ok, 3),
        last_client_any_s=None if last_any is None else round(last_any, 3),
        last_ratio=None if last_ok is None else round(last_ok / bound, 3),
        rate_mbit=None if rate is None else round(rate * 8 / 1e6, 1),
        rate_of_link=None if rate is None else round(rate / link_rate(mbit), 3),
        ttfb_median_s=round(statistics.median(ttfbs), 4) if ttfbs else None,
        ttfb_worst_s=round(ttfbs[-1], 4) if ttfbs else None,
        relay_resets=resets,
        origin_full_gets=origin.full_gets,
        origin_range_gets=origin.range_gets,
        origin_metadata=origin.metadata,
        origin_body_bytes=origin.body_bytes,
        origin_body_statuses=dict(origin.statuses),  # GETs of the image's bytes, by status
        notes=list(notes),
    )


def _fmt(value: object, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(rows: Sequence[dict[str, object]]) -> list[str]:
    """The rounds as a Markdown table (readable as plain text too)."""
    out = [
        "| scenario | subject | link bytes / image (wire) | last client s (/ bound) | rate Mbit/s "
        "| TTFB median / worst s | clients ok | origin GET 200/206, metadata | resets |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        last = _fmt(r["last_client_s"], ".2f")
        ratio = _fmt(r["last_ratio"], ".2f", "x")
        out.append(
            f"| {r['scenario']} | {r['subject']} | {_fmt(r['link_ratio'], '.3f', 'x')} "
            f"({_fmt(r.get('wire_ratio'), '.3f', 'x')}) "
            f"| {last} ({ratio} of {_fmt(r['bound_s'], '.2f')}) "
            f"| {_fmt(r['rate_mbit'], '.0f')} "
            f"| {_fmt(r['ttfb_median_s'], '.3f')} / {_fmt(r['ttfb_worst_s'], '.3f')} "
            f"| {r['clients_ok']}/{r['clients']} "
            f"| {r['origin_full_gets']}/{r['origin_range_gets']}, {r['origin_metadata']} "
            f"| {r['relay_resets']} |"
        )
    return out


LINK_TARGET = 1.01
LAST_TARGET = 1.1
SEGMENTED_TARGET = 0.8


def verdicts(rows: Sequence[dict[str, object]], subject: str) -> list[str]:
    """The issue's targets for ``subject`` (imagecache), one line each, with the numbers."""
    lines: list[str] = []
    for r in rows:
        if r["subject"] != subject:
            continue
        scenario = str(r["scenario"])
        label = scenario if r.get("round", 1) == 1 else f"{scenario} (round {r['round']})"
        everyone = r["clients_ok"] == r["clients"]
        ok_clients = f"{r['clients_ok']}/{r['clients']} clients ok"
        if scenario in ("storm", "storm-reset"):
            link = float(str(r["link_ratio"]))
            held = "holds" if link <= LINK_TARGET and everyone else "MISSED"
            wire = _fmt(r.get("wire_ratio"), ".3f", "x")
            lines.append(
                f"{label}: link bytes {link:.3f}x the image (≤ {LINK_TARGET}x, "
                f"{ok_clients}; on the wire {wire}): {held}"
            )
        if scenario == "storm":
            last = r["last_ratio"]
            held = "holds" if last is not None and float(str(last)) <= LAST_TARGET else "MISSED"
            lines.append(
                f"{label}: last client {_fmt(r['last_client_s'], '.2f')} s = "
                f"{_fmt(last, '.2f')}x the bound {r['bound_s']} s (≤ {LAST_TARGET}x): {held}"
            )
        if scenario == "per-connection-limit":
            share = r["rate_of_link"]
            segments = int(str(r.get("segments", 1)))
            reached = (
                f"reached {_fmt(r['rate_mbit'], '.0f')} Mbit/s = {_fmt(share, '.2f')} of the link"
            )
            if segments > 1:
                met = share is not None and float(str(share)) >= SEGMENTED_TARGET and everyone
                lines.append(
                    f"{label}: {segments} segments {reached} (≥ {SEGMENTED_TARGET}, "
                    f"{ok_clients}): {'holds' if met else 'MISSED'}"
                )
            else:
                lines.append(
                    f"{label}: one connection per fill {reached} (the baseline; "
                    f"the target ≥ {SEGMENTED_TARGET} is for segmented fills, --segments N)"
                )
    return lines
