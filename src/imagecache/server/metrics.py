"""Prometheus metrics of one service process, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)


class Metrics:
    """The counters the service updates; ``render()`` gives the exposition text."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
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
        self.verification_failures = Counter(
            "imagecache_verification_failures",
            "Fills whose bytes did not match the size or hash the origin promised",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
