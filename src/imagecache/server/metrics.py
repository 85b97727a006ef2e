"""Prometheus metrics of the service, in registries of its own (no global state).

With several worker processes on one port, a scrape reaches whichever worker
accepts it. So that it still sees the whole service, each worker publishes its
numbers to a directory private to this service (``share_dir``, made by the
pre-fork parent) about once a second, and the scraped worker merges its own
fresh numbers with its siblings' latest: counters and histograms add up,
``*_created`` takes the earliest, gauges add up except those that state a
setting and are the same in every worker. prometheus-client's own
multiprocess mode was not used: it must be switched on by an environment
variable before the library is imported, and it cannot carry the custom
collectors of the operations layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import Metric

from imagecache.fill.events import FillOutcome
from imagecache.upstreams.resume_events import RESUME_OUTCOMES, ResumeOutcome

if TYPE_CHECKING:
    from imagecache.upstreams.sibling import FillSource

# Gauges that state a setting: every worker reports the same value.
# Gauges that state a setting or a fact of the shared cache directory: every
# worker reports (about) the same value, and the merge keeps the largest. The
# oldest fill's age is the largest of the workers' by definition.
_SAME_IN_EVERY_WORKER = frozenset(
    {
        "imagecache_max_size_bytes",
        "imagecache_free_space_watermark_bytes",
        "imagecache_cluster_nodes_live",
        "imagecache_cluster_database_up",
        "imagecache_cluster_outbox_images",
        "imagecache_cached_bytes",
        "imagecache_disk_free_bytes",
        "imagecache_database_up",
        "imagecache_oldest_fill_age_seconds",
    }
)
PUBLISH_INTERVAL = 1.0


class Metrics:
    """The counters the service updates; ``render()`` gives the exposition text.

    It is also the sink the library reports to (``fill.events.FillEvents``,
    ``upstreams.sibling.SiblingEvents``, ``upstreams.resume_events.ResumeEvents``),
    by the methods after the counters.
    """

    content_type = CONTENT_TYPE

    def __init__(self, share_dir: Path | None = None) -> None:
        self.share_dir = share_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.hits = Counter("imagecache_hits", "Image downloads served from the cache", registry=r)
        self.misses = Counter(
            "imagecache_misses", "Image downloads that needed the upstream", registry=r
        )
        self.followers = Counter(
            "imagecache_fill_followers",
            "Downloads that joined a fill already in flight (here or in another process)",
            registry=r,
        )
        self.bypasses = Counter(
            "imagecache_bypasses",
            "Downloads streamed from the upstream without caching, by reason",
            ["reason"],
            registry=r,
        )
        self.offline_hits = Counter(
            "imagecache_offline_hits",
            "Hits served under offline_grace: the origin could not check the caller",
            registry=r,
        )
        self.bytes_from_cache = Counter(
            "imagecache_bytes_from_cache", "Bytes sent to clients from cached files", registry=r
        )
        self.bytes_from_upstream = Counter(
            "imagecache_bytes_from_upstream", "Bytes read from the upstream", registry=r
        )
        self.fills_in_flight = Gauge(
            "imagecache_fills_in_flight", "Fills this process is writing now", registry=r
        )
        self.fill_seconds = Histogram(
            "imagecache_fill_seconds",
            "Duration of fills, by outcome",
            ["outcome"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.upstream_errors = Counter(
            "imagecache_upstream_errors",
            "Requests and fills that failed at the origin (unreachable, 5xx, cut off mid-body); "
            "refusals and unknown images are not errors",
            registry=r,
        )
        # The pre-fork parent counts replaced workers and publishes them beside the
        # workers' numbers (server/supervisor.py); a worker's own count stays 0.
        self.worker_restarts = Counter(
            "imagecache_worker_restarts",
            "Worker processes that died and were replaced",
            registry=r,
        )
        self.verification_failures = Counter(
            "imagecache_verification_failures",
            "Fills whose bytes did not match the size or hash the origin promised",
            registry=r,
        )
        # No kind label: a service has one origin, whose kind its settings name.
        self.upstream_resumes = Counter(
            "imagecache_upstream_resumes",
            "Resumes of origin bodies broken mid-way, by outcome: resumed (the same image "
            "continued), refused (the origin's answer was another version: the body failed, "
            "nothing spliced), exhausted (upstream_resume_attempts ran out)",
            ["outcome"],
            registry=r,
        )
        for outcome in RESUME_OUTCOMES:
            self.upstream_resumes.labels(outcome)  # shown at 0 from the start
        # Background fills (fill/bandwidth.py): the queue worker's and prefetch's.
        self.background_bytes = Counter(
            "imagecache_background_bytes",
            "Bytes read from the upstream by background fills (queue, prefetch, fills whose "
            "clients left); also counted in imagecache_bytes_from_upstream",
            registry=r,
        )
        self.background_throttled_seconds = Counter(
            "imagecache_background_throttled_seconds",
            "Seconds background fills waited for their bandwidth (background_bandwidth, or "
            "background_bandwidth_while_busy while on-demand fills run), summed over the fills",
            registry=r,
        )
        self.background_released_total = Counter(
            "imagecache_background_connections_released",
            "Origin connections background fills closed because they stayed paused for "
            "on-demand fills (the rest is asked for with a Range request when they resume)",
            registry=r,
        )
        self.background_rate_gauge = Gauge(
            "imagecache_background_rate_limit_bytes_per_second",
            "The rate background fills may read from the upstream now, summed over the worker "
            "processes (+Inf: no limit; 0: paused for on-demand fills)",
            registry=r,
        )

        # Cluster mode only (server/cluster.py, upstreams/sibling.py set them);
        # outside it they stay at 0.
        self.cluster_fills = Counter(
            "imagecache_cluster_fills",
            "Whole-image upstream reads in cluster mode, by where the bytes came from: "
            "sibling, origin, or sibling_then_origin (a sibling failed part-way)",
            ["source"],
            registry=r,
        )
        self.cluster_nodes_live = Gauge(
            "imagecache_cluster_nodes_live",
            "Live nodes in the cluster (this one included) at this node's last heartbeat",
            registry=r,
        )
        self.cluster_database_up = Gauge(
            "imagecache_cluster_database_up",
            "1 if the cluster database answered this node's last heartbeat, else 0 (the node "
            "then serves from its local records and queues its changes)",
            registry=r,
        )
        self.cluster_outbox_images = Gauge(
            "imagecache_cluster_outbox_images",
            "Images whose local changes the cluster database has not received yet, after "
            "this node's last heartbeat",
            registry=r,
        )

    # --- fill.events.FillEvents -----------------------------------------------------------------

    def fill_started(self) -> None:
        self.fills_in_flight.inc()

    def fill_ended(self, outcome: FillOutcome, seconds: float) -> None:
        self.fills_in_flight.dec()
        self.fill_seconds.labels(outcome).observe(seconds)

    def fill_unverified(self) -> None:
        self.verification_failures.inc()

    def origin_failed(self) -> None:
        self.upstream_errors.inc()

    def upstream_read(self, count: int) -> None:
        self.bytes_from_upstream.inc(count)

    def background_read(self, count: int) -> None:
        self.background_bytes.inc(count)

    def background_throttled(self, seconds: float) -> None:
        self.background_throttled_seconds.inc(seconds)

    def background_released(self) -> None:
        self.background_released_total.inc()

    def background_rate_limit(self, bytes_per_second: float) -> None:
        self.background_rate_gauge.set(bytes_per_second)

    # --- upstreams.sibling.SiblingEvents ---------------------------------------------------------

    def filled_from(self, source: FillSource) -> None:
        self.cluster_fills.labels(source.value).inc()

    # --- upstreams.resume_events.ResumeEvents (also from the fill pump's threads) ---------------

    def resume_outcome(self, outcome: ResumeOutcome) -> None:
        self.upstream_resumes.labels(outcome).inc()

    def render(self) -> bytes:
        """The exposition text: this process's, or the whole service's with workers."""
        own = generate_latest(self.registry)
        if self.share_dir is None:
            return own
        self._write(own)
        return merge_expositions([own, *self._siblings()])

    def publish(self) -> None:
        """Write this worker's numbers where its siblings read them."""
        if self.share_dir is not None:
            self._write(generate_latest(self.registry))

    async def publish_periodically(self) -> None:
        """Publish until cancelled; then withdraw, so a stopped worker is not counted."""
        try:
            while True:
                await asyncio.to_thread(self.publish)
                await asyncio.sleep(PUBLISH_INTERVAL)
        finally:
            if self.share_dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    (self.share_dir / f"{os.getpid()}.prom").unlink()

    def _write(self, text: bytes) -> None:
        assert self.share_dir is not None
        path = self.share_dir / f"{os.getpid()}.prom"
        # One temporary name per thread: the periodic publisher (a thread) and
        # a scrape (the loop) may write at once, and a shared name let one
        # rename the other's file away (FileNotFoundError under bench/load.py).
        partial = self.share_dir / f".{os.getpid()}.{threading.get_ident()}.partial"
        partial.write_bytes(text)
        os.replace(partial, path)  # readers never see half a file

    def _siblings(self) -> Iterator[bytes]:
        assert self.share_dir is not None
        for path in self.share_dir.glob("*.prom"):
            pid = int(path.stem) if path.stem.isdigit() else None
            if pid is None or pid == os.getpid():
                continue
            if not _alive(pid):
                path.unlink(missing_ok=True)  # a worker that died without withdrawing
                continue
            with contextlib.suppress(FileNotFoundError):
                yield path.read_bytes()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merge_expositions(texts: Iterable[bytes]) -> bytes:
    """Merge several processes' exposition texts into one (rules in the module docstring)."""
    # Only a pre-forked service's scrapes parse texts: not an import of every start.
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            slot = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in slot:
                    slot[key] = sample.value
                elif family.name.endswith("_created"):
                    slot[key] = min(slot[key], sample.value)
                elif family.name in _SAME_IN_EVERY_WORKER:
                    slot[key] = max(slot[key], sample.value)
                else:
                    slot[key] = slot[key] + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    """A collector that yields families it was given."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
