"""Scheduled maintenance: each job runs on its interval, 0 disables it, failures don't stop it."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from imagecache import ImageCache, Settings
from imagecache.maintenance import Maintenance, Schedule, evict_idle
from imagecache.prefetch import Prefetcher, prefetch_config
from test_prefetch import ScriptedUpstream


async def test_jobs_run_on_their_intervals(make_settings: Callable[..., Settings]) -> None:
    upstream = ScriptedUpstream({"queued": b"q" * 5000})
    settings = make_settings(
        image_cache_max_size=3000,
        prune_interval=0.01,
        clean_interval=0.01,
        queue_interval=0.01,
        scrub_interval=0,  # disabled
    )
    with ImageCache(settings) as cache:
        assert cache.cache_image_iter("old", [b"o" * 2000])
        assert cache.cache_image_iter("new", [b"n" * 2000])
        cache.driver.layout.invalid_path("junk").write_bytes(b"j")
        cache.queue_image("queued")
        maintenance = Maintenance(
            cache,
            Schedule.of(settings),
            Prefetcher.standalone(prefetch_config(settings), cache, upstream),
        )
        await maintenance.start()
        try:
            async with asyncio.timeout(10):
                await maintenance.wait_for("reconcile", 1)
                await maintenance.wait_for("prune", 2)
                await maintenance.wait_for("clean", 2)
                await maintenance.wait_for("queue", 2)
        finally:
            await maintenance.stop()
        assert maintenance.runs["scrub"] == 0
        assert not cache.driver.layout.invalid_path("junk").exists()
        # The queue was re-driven (the upstream image is bigger than the limit
        # allows, so it stays queued with its error) ...
        assert upstream.streams["queued"] == 0
        assert cache.get_queued_images() == ["queued"]
        # ... and prune kept the cache under its limit.
        assert cache.get_cache_size() <= 3000
        assert maintenance.failures == {}


async def test_a_failing_job_keeps_its_schedule(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        prune_interval=0.01, clean_interval=0, queue_interval=0, scrub_interval=0
    )
    with ImageCache(settings) as cache:
        maintenance = Maintenance(cache, Schedule.of(settings))
        calls = 0

        async def broken() -> None:
            nonlocal calls
            calls += 1
            raise OSError("disk on fire")

        maintenance.prune = broken  # type: ignore[method-assign]
        await maintenance.start()
        try:
            async with asyncio.timeout(10):
                await maintenance.wait_for("prune", 3)
        finally:
            await maintenance.stop()
        assert maintenance.failures["prune"] >= 3
        # Jobs set to 0 never ran; reconcile and the usage sample always do.
        assert set(maintenance.runs) <= {"prune", "reconcile", "usage"}


def test_idle_ttl_spares_pinned_and_recent(make_settings: Callable[..., Settings]) -> None:
    with ImageCache(make_settings(idle_ttl=3600)) as cache:
        for image_id in ("idle", "pinned", "recent"):
            assert cache.cache_image_iter(image_id, [image_id.encode() * 100])
        two_hours_ago = time.time() - 7200
        for image_id in ("idle", "pinned"):
            image = cache.get_cached_image(image_id)
            assert image is not None
            aged = dataclasses.replace(
                image, last_accessed=two_hours_ago, pinned=image_id == "pinned"
            )
            cache.driver.record_image(aged, replace=True)
        assert evict_idle(cache, 3 * 3600).files == 0  # nothing idle for three hours
        assert evict_idle(cache, 3600) == (1, 400)  # "idle" only
        assert [image.image_id for image in cache.get_cached_images()] == ["pinned", "recent"]
        assert evict_idle(cache, 0).files == 0


async def test_the_scheduled_scrub_quarantines(
    make_settings: Callable[..., Settings], cache_dir: Path
) -> None:
    settings = make_settings(
        prune_interval=0, clean_interval=0, queue_interval=0, scrub_interval=0.01
    )
    with ImageCache(settings) as cache:
        assert cache.cache_image_iter("good", [b"g" * 100_000])
        assert cache.cache_image_iter("rotten", [b"r" * 100_000])
        await asyncio.to_thread(_flip_a_byte, cache_dir / "rotten")
        maintenance = Maintenance(cache, Schedule.of(settings))
        await maintenance.start()
        try:
            async with asyncio.timeout(10):
                await maintenance.wait_for("scrub", 1)
        finally:
            await maintenance.stop()
        assert maintenance.last_result["scrub"]["corrupt"] == ["rotten"]
        assert [image.image_id for image in cache.get_cached_images()] == ["good"]
        assert (cache_dir / "invalid" / "rotten").exists()


def _flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(50_000)
        handle.write(b"X")


async def test_scheduled_prune_waits_for_a_manual_one_elsewhere(
    make_settings: Callable[..., Settings],
) -> None:
    """The prune lock is an flock: another process (here: another open of the lock file) holding
    it keeps the scheduled prune waiting until it lets go."""
    settings = make_settings(image_cache_max_size=1000)
    with ImageCache(settings) as cache, ImageCache(settings) as other:
        assert cache.cache_image_iter("a", [b"a" * 800])
        assert cache.cache_image_iter("b", [b"b" * 800])
        maintenance = Maintenance(cache, Schedule.of(settings))
        with other.exclusive("prune"):
            job = asyncio.create_task(maintenance.prune())
            done, _ = await asyncio.wait([job], timeout=0.3)
            assert not done, "prune ran while another holder had the lock"
            assert len(cache.get_cached_images()) == 2
        async with asyncio.timeout(10):
            result = await job
        assert result.files == 1
        assert cache.get_cache_size() <= 1000


async def test_stop_waits_for_a_job_still_in_its_thread(
    make_settings: Callable[..., Settings],
) -> None:
    """A cancelled task cannot stop its thread; stop() must outlast it, or the caller would
    close the database under a running query (that crashed the process once)."""
    settings = make_settings(prune_interval=0, clean_interval=0, queue_interval=0, scrub_interval=0)
    with ImageCache(settings) as cache, ImageCache(settings) as other:
        maintenance = Maintenance(cache, Schedule.of(settings))
        with other.exclusive("reconcile"):  # the start-up reconcile blocks in its thread
            await maintenance.start()
            stopping = asyncio.create_task(maintenance.stop())
            done, _ = await asyncio.wait([stopping], timeout=0.3)
            assert not done, "stop() returned while the reconcile thread was still running"
        async with asyncio.timeout(10):
            await stopping


def test_the_usage_sample_reports_the_cache_and_a_lost_database(tmp_path: Path) -> None:
    from central_db import central_settings, create_database, drop_database, postgres_url
    from imagecache.drivers.central import CentralDriver
    from imagecache.maintenance import sample_usage

    name = create_database()
    try:
        with ImageCache(central_settings(tmp_path / "cache", postgres_url(name))) as cache:
            assert cache.cache_image_iter("img", [b"x" * 1000])
            up = sample_usage(cache)
            assert up.metadata_up
            assert up.cached_bytes == 1000
            assert up.disk_free_bytes is not None
            assert up.disk_free_bytes > 0
            drop_database(name)  # FORCE: the driver's connections are cut
            # The central driver reads its own rows locally (drivers/central/mirror.py):
            # the sample still knows the cache; the database's loss is the cluster's
            # gauge and readiness check (imagecache_cluster_database_up), asked here.
            down = sample_usage(cache)
            assert down.metadata_up
            assert down.cached_bytes == 1000
            assert down.disk_free_bytes is not None
            driver = cache.driver
            assert isinstance(driver, CentralDriver)
            ok, detail = driver.database_state()
            assert not ok
            assert detail.startswith("the central database does not answer")
    finally:
        drop_database(name)
