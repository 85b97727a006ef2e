"""The prefetcher: retries, recorded errors, bounded concurrency, never a re-download."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagecache import ImageCache, ImageInfo, Settings
from imagecache.cli import main
from imagecache.errors import UpstreamError, UpstreamNotFound
from imagecache.fill.flight import FlightKind
from imagecache.prefetch import Prefetcher, prefetch_config, queued_details
from imagecache.records import PrefetchOutcome
from imagecache.upstreams.base import ANONYMOUS, Caller, Upstream
from polling import eventually


class ScriptedUpstream(Upstream):
    """An in-memory origin whose failures are scripted per image.

    A real origin cannot be told "fail exactly twice, then succeed" or "send
    these wrong bytes"; this one can, which is what these tests are about.
    """

    kind = "scripted"

    def __init__(self, images: dict[str, bytes]) -> None:
        self.images = images
        self.fail_first: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.streams: Counter[str] = Counter()
        self.active = 0
        self.max_active = 0

    async def info(self, image_id: str, caller: Caller = ANONYMOUS) -> ImageInfo:
        if image_id not in self.images:
            raise UpstreamNotFound(image_id)
        data = self.images[image_id]
        return ImageInfo(
            image_id,
            size=len(data),
            hash_algo="sha256",
            hash_value=hashlib.sha256(data).hexdigest(),
        )

    async def stream(
        self, image_id: str, caller: Caller = ANONYMOUS, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        self.streams[image_id] += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.streams[image_id] <= self.fail_first.get(image_id, 0):
                raise UpstreamError(f"connection reset while reading {image_id}")
            data = self.images[image_id]
            if image_id in self.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            for offset in range(0, len(data), 64 * 1024):
                await asyncio.sleep(0)  # let the other fills interleave
                yield data[offset : offset + 64 * 1024]
        finally:
            self.active -= 1


def _images(n: int, size: int = 200_000) -> dict[str, bytes]:
    return {f"img-{i}": bytes([i]) * size + f"{i}".encode() for i in range(n)}


async def test_retries_a_flaky_image_and_quarantines_a_corrupt_one(
    make_settings: Callable[..., Settings], cache_dir: Path
) -> None:
    upstream = ScriptedUpstream(_images(5))
    upstream.fail_first["img-1"] = 2
    upstream.corrupt.add("img-2")
    settings = make_settings(prefetch_retries=3, prefetch_concurrency=2)
    with ImageCache(settings) as cache:
        for image_id in upstream.images:
            assert cache.queue_image(image_id)
        report = await Prefetcher.standalone(
            prefetch_config(settings), cache, upstream, backoff=0.01
        ).run()

        assert report.outcomes["img-1"] is PrefetchOutcome.CACHED
        assert upstream.streams["img-1"] == 3  # two failures, then success
        assert report.outcomes["img-2"] is PrefetchOutcome.FAILED
        assert upstream.streams["img-2"] == 1  # wrong bytes are not transient
        for good in ("img-0", "img-1", "img-3", "img-4"):
            with cache.open_for_read(good) as handle:
                assert handle.read() == upstream.images[good]
        assert not cache.is_cached("img-2")
        assert (cache_dir / "invalid" / "img-2").exists()

        # Only the corrupt image is still queued, with its error beside it.
        [left] = queued_details(cache)
        assert left.image_id == "img-2"
        assert left.error is not None
        assert "verification" in left.error
        assert left.attempts == 1

    result = CliRunner().invoke(main, ["--cache-dir", str(cache_dir), "list-queued"])
    assert result.exit_code == 0, result.output
    assert "img-2" in result.output
    assert "verification" in result.output
    as_json = CliRunner().invoke(main, ["--cache-dir", str(cache_dir), "--json", "list-queued"])
    assert json.loads(as_json.output)[0]["error"] == left.error


async def test_gives_up_after_the_retries_and_keeps_the_marker(
    make_settings: Callable[..., Settings],
) -> None:
    upstream = ScriptedUpstream(_images(1))
    upstream.fail_first["img-0"] = 10
    settings = make_settings(prefetch_retries=2)
    with ImageCache(settings) as cache:
        cache.queue_image("img-0")
        report = await Prefetcher.standalone(
            prefetch_config(settings), cache, upstream, backoff=0.001
        ).run()
        assert report.outcomes["img-0"] is PrefetchOutcome.FAILED
        assert upstream.streams["img-0"] == 3
        [left] = queued_details(cache)
        assert left.attempts == 3
        assert "connection reset" in (left.error or "")

        # The next run succeeds once the origin recovers, and forgets the error.
        upstream.fail_first.clear()
        report = await Prefetcher.standalone(
            prefetch_config(settings), cache, upstream, backoff=0.001
        ).run()
        assert report.outcomes["img-0"] is PrefetchOutcome.CACHED
        assert queued_details(cache) == []
        assert not list((cache.driver.layout.queue_dir).iterdir())


async def test_permanent_refusals_are_not_retried(make_settings: Callable[..., Settings]) -> None:
    upstream = ScriptedUpstream({})
    settings = make_settings(prefetch_retries=5)
    with ImageCache(settings) as cache:
        cache.queue_image("missing")
        report = await Prefetcher.standalone(
            prefetch_config(settings), cache, upstream, backoff=0.001
        ).run()
        assert report.outcomes["missing"] is PrefetchOutcome.FAILED
        [left] = queued_details(cache)
        assert left.attempts == 1
        assert "not found" in (left.error or "")


async def test_never_redownloads_a_cached_image(make_settings: Callable[..., Settings]) -> None:
    upstream = ScriptedUpstream(_images(1))
    data = upstream.images["img-0"]
    settings = make_settings()
    with ImageCache(settings) as cache:
        cache.queue_image("img-0")
        # Someone else caches it before the prefetcher gets to it.
        assert cache.cache_image_iter("img-0", [data])
        (cache.driver.layout.queue_dir / "img-0").touch()
        report = await Prefetcher.standalone(prefetch_config(settings), cache, upstream).run(
            ["img-0"]
        )
        assert report.outcomes["img-0"] is PrefetchOutcome.ALREADY_CACHED
        assert upstream.streams["img-0"] == 0
        assert cache.get_queued_images() == []


async def test_concurrency_is_bounded(make_settings: Callable[..., Settings]) -> None:
    upstream = ScriptedUpstream(_images(8, size=600_000))
    settings = make_settings(prefetch_concurrency=2)
    with ImageCache(settings) as cache:
        for image_id in upstream.images:
            cache.queue_image(image_id)
        report = await Prefetcher.standalone(prefetch_config(settings), cache, upstream).run()
        assert report.ok
        assert len(cache.get_cached_images()) == 8
        assert 1 <= upstream.max_active <= 2


async def test_with_the_directory_upstream(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    directory = pytest.importorskip(
        "imagecache.upstreams.directory", reason="SKIPPED: the directory upstream is not built yet"
    )
    origin = tmp_path / "origin"
    origin.mkdir()
    good, bad = b"good image " * 50_000, b"bad image " * 50_000
    (origin / "good").write_bytes(good)
    (origin / "good.sha256").write_text(hashlib.sha256(good).hexdigest())
    (origin / "bad").write_bytes(bad)
    (origin / "bad.sha256").write_text(hashlib.sha256(b"something else").hexdigest())
    upstream = directory.DirectoryUpstream(origin)
    settings = make_settings()
    with ImageCache(settings) as cache:
        for image_id in ("good", "bad", "absent"):
            cache.queue_image(image_id)
        report = await Prefetcher.standalone(
            prefetch_config(settings), cache, upstream, backoff=0.001
        ).run()
        await upstream.close()
        assert report.outcomes == {
            "good": PrefetchOutcome.CACHED,
            "bad": PrefetchOutcome.FAILED,
            "absent": PrefetchOutcome.FAILED,
        }
        with cache.open_for_read("good") as handle:
            assert handle.read() == good
        assert cache.get_cached_image("good").hash_value == hashlib.sha256(good).hexdigest()  # type: ignore[union-attr]
        errors = {q.image_id: q.error for q in queued_details(cache)}
        assert set(errors) == {"bad", "absent"}
        assert "sha256" in (errors["bad"] or "")
        assert "not found" in (errors["absent"] or "")


async def test_a_standalone_prefetch_shares_a_fill_running_on_the_same_directory(
    make_settings: Callable[..., Settings],
) -> None:
    """The CLI's prefetch follows a service's fill of the image (through its lock), not skips it.

    The other writer is a second ``ImageCache`` over the same directory; its
    fill lock is on a file description of its own, as another process's is.
    """
    upstream = ScriptedUpstream(_images(1))
    data = upstream.images["img-0"]
    settings = make_settings()
    with ImageCache(settings) as cache, ImageCache(make_settings()) as other:
        cache.queue_image("img-0")
        writer = other.writer("img-0", await upstream.info("img-0"))
        assert writer.open()
        await asyncio.to_thread(writer.write, data[:1000])
        prefetcher = Prefetcher.standalone(prefetch_config(settings), cache, upstream)
        run = asyncio.create_task(prefetcher.run())

        def following() -> bool:
            flight = prefetcher.fills.current("img-0")
            return flight is not None and flight.kind is FlightKind.REMOTE

        await eventually(following, "the prefetch follows the running fill")
        await asyncio.to_thread(writer.write, data[1000:])
        await asyncio.to_thread(writer.finish)
        report = await asyncio.wait_for(run, 10)
        assert report.outcomes["img-0"] is PrefetchOutcome.CACHED
        assert upstream.streams["img-0"] == 0, "the origin is read once, by the other writer"
        assert cache.get_queued_images() == []
        with cache.open_for_read("img-0") as handle:
            assert handle.read() == data
