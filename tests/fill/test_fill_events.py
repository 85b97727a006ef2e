"""The fill coordinator reports to the event sink it is given, with no service around it.

Real parts: an ``ImageCache`` on a private directory (sqlite driver) and a
directory upstream; the sink is a recorder, the one thing the library is
handed from outside. The service's ``Metrics`` is checked against the same
protocol, so what ``/metrics`` counts is what a fill reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from imagecache.cache import ImageCache
from imagecache.fill import fill_config
from imagecache.fill.coordinator import FillCoordinator
from imagecache.fill.events import NO_EVENTS, FillEvents, FillOutcome
from imagecache.fill.flight import FlightKind
from imagecache.records import ImageInfo
from imagecache.server.metrics import Metrics
from imagecache.settings import Settings
from imagecache.upstreams.base import ANONYMOUS
from imagecache.upstreams.directory import DirectoryUpstream
from server_helpers import image_bytes

DATA = image_bytes(3 * 1024 * 1024 + 7, seed=11)


class Recorder:
    """A ``FillEvents`` sink that keeps what it was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.bytes = 0
        self.background_bytes = 0
        self.rates: list[float] = []

    def fill_started(self) -> None:
        self.events.append(("started", None))

    def fill_ended(self, outcome: FillOutcome, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("ended", outcome))

    def fill_unverified(self) -> None:
        self.events.append(("unverified", None))

    def origin_failed(self) -> None:
        self.events.append(("origin_failed", None))

    def upstream_read(self, count: int) -> None:
        self.bytes += count

    def background_read(self, count: int) -> None:
        self.background_bytes += count

    def background_throttled(self, seconds: float) -> None:
        assert seconds >= 0

    def background_released(self) -> None:
        self.events.append(("released", None))

    def background_rate_limit(self, bytes_per_second: float) -> None:
        self.rates.append(bytes_per_second)


@pytest.fixture
async def coordinator_for(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[[FillEvents], FillCoordinator]]:
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "img").write_bytes(DATA)
    settings = make_settings()
    cache = ImageCache(settings)
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    made: list[FillCoordinator] = []

    def make(events: FillEvents) -> FillCoordinator:
        made.append(
            FillCoordinator(
                fill_config(settings), cache, DirectoryUpstream(origin), events, executor
            )
        )
        return made[-1]

    yield make
    for coordinator in made:
        await coordinator.shutdown(5.0)
    executor.shutdown(wait=True)


async def _fill(coordinator: FillCoordinator, info: ImageInfo) -> BaseException | None:
    flight = await coordinator.join("img", info, ANONYMOUS, detached=True)
    assert flight.kind is FlightKind.LOCAL
    assert flight.task is not None
    await asyncio.shield(flight.task)
    return flight.error


async def test_a_committed_fill_reports_its_start_bytes_and_outcome(
    coordinator_for: Callable[[FillEvents], FillCoordinator],
) -> None:
    sink = Recorder()
    coordinator = coordinator_for(sink)
    info = ImageInfo("img", size=len(DATA), checksum=hashlib.md5(DATA).hexdigest())
    assert await _fill(coordinator, info) is None
    assert sink.events == [("started", None), ("ended", "committed")]
    assert sink.bytes == len(DATA)
    assert coordinator.cache.is_cached("img")


async def test_a_fill_that_fails_verification_reports_it(
    coordinator_for: Callable[[FillEvents], FillCoordinator],
) -> None:
    sink = Recorder()
    coordinator = coordinator_for(sink)
    wrong = ImageInfo("img", size=len(DATA), checksum=hashlib.md5(b"other").hexdigest())
    assert await _fill(coordinator, wrong) is not None
    assert sink.events == [("started", None), ("unverified", None), ("ended", "failed")]
    assert sink.bytes == len(DATA)
    assert not coordinator.cache.is_cached("img")


async def test_the_library_fills_with_no_sink(
    coordinator_for: Callable[[FillEvents], FillCoordinator],
) -> None:
    coordinator = coordinator_for(NO_EVENTS)
    assert await _fill(coordinator, ImageInfo("img", size=len(DATA))) is None
    assert coordinator.cache.is_cached("img")


def test_the_service_metrics_count_what_a_fill_reports() -> None:
    metrics = Metrics()
    sink: FillEvents = metrics  # mypy checks the protocol; the values below, the wiring
    sink.fill_started()
    sink.upstream_read(10)
    sink.fill_unverified()
    sink.origin_failed()
    sink.fill_ended("failed", 0.25)
    value = metrics.registry.get_sample_value
    assert value("imagecache_fills_in_flight") == 0
    assert value("imagecache_bytes_from_upstream_total") == 10
    assert value("imagecache_verification_failures_total") == 1
    assert value("imagecache_upstream_errors_total") == 1
    assert value("imagecache_fill_seconds_count", {"outcome": "failed"}) == 1
    assert value("imagecache_fill_seconds_sum", {"outcome": "failed"}) == 0.25
