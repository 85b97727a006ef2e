"""Merging the metrics of several worker processes into one scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from imagecache.server.metrics import merge_expositions


def _worker(hits: int, in_flight: int, fill_seconds: float, created: float) -> bytes:
    registry = CollectorRegistry()
    counter = Counter("imagecache_hits", "h", ["kind"], registry=registry)
    counter.labels("full").inc(hits)
    Gauge("imagecache_fills_in_flight", "f", registry=registry).set(in_flight)
    Gauge("imagecache_max_size_bytes", "m", registry=registry).set(1000)
    Histogram("imagecache_fill_seconds", "s", buckets=(1, 10), registry=registry).observe(
        fill_seconds
    )
    text = generate_latest(registry).decode()
    # Pin the creation time so the test can tell min from sum.
    lines = [
        f'imagecache_hits_created{{kind="full"}} {created}'
        if line.startswith("imagecache_hits_created")
        else line
        for line in text.splitlines()
    ]
    return ("\n".join(lines) + "\n").encode()


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def test_counters_and_histograms_add_up_settings_do_not() -> None:
    merged = _samples(merge_expositions([_worker(3, 1, 0.5, 200.0), _worker(4, 2, 5.0, 100.0)]))
    assert merged[("imagecache_hits_total", (("kind", "full"),))] == 7
    assert merged[("imagecache_hits_created", (("kind", "full"),))] == 100.0
    assert merged[("imagecache_fills_in_flight", ())] == 3
    assert merged[("imagecache_max_size_bytes", ())] == 1000
    assert merged[("imagecache_fill_seconds_count", ())] == 2
    assert merged[("imagecache_fill_seconds_bucket", (("le", "1.0"),))] == 1
    assert merged[("imagecache_fill_seconds_sum", ())] == 5.5


def test_one_worker_merges_to_itself() -> None:
    text = _worker(3, 1, 0.5, 200.0)
    assert _samples(merge_expositions([text])) == _samples(text)
