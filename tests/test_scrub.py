"""Integrity at rest: a flipped byte is found and quarantined; the scrub keeps its rate."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from imagecache import CachedImage, ImageCache, ImageInfo, Settings
from imagecache.records import ScrubOutcome
from imagecache.scrub import Scrubber

MiB = 1024 * 1024


def _cache(cache: ImageCache, image_id: str, data: bytes, info: ImageInfo | None = None) -> None:
    assert cache.cache_image_iter(image_id, [data], info or ImageInfo(image_id, size=len(data)))


@pytest.mark.parametrize("kind", ["sqlite", "xattr"])
def test_a_flipped_byte_is_quarantined(kind: str, cache_dir: Path, tmp_path: Path) -> None:
    from driver_kinds import settings_for

    sha512 = hashlib.sha512(b"s" * MiB).hexdigest()
    md5 = hashlib.md5(b"m" * MiB).hexdigest()
    with ImageCache(settings_for(kind, cache_dir, tmp_path)) as cache:
        _cache(cache, "computed", b"c" * MiB)  # no hash from the origin: sha256 recorded
        _cache(cache, "multihash", b"s" * MiB, ImageInfo("multihash", MiB, None, "sha512", sha512))
        _cache(cache, "legacy", b"m" * MiB, ImageInfo("legacy", MiB, checksum=md5))
        assert cache.get_cached_image("computed").hash_algo == "sha256"  # type: ignore[union-attr]
        scrubber = Scrubber(cache, bytes_per_second=0)
        assert scrubber.run().ok

        for image_id in ("computed", "multihash", "legacy"):
            with open(cache_dir / image_id, "r+b") as handle:
                handle.seek(MiB // 2)
                original = handle.read(1)
                handle.seek(MiB // 2)
                handle.write(bytes([original[0] ^ 0x01]))
        report = scrubber.run()
        assert sorted(report.corrupt) == ["computed", "legacy", "multihash"]
        assert report.bytes_read == 3 * MiB
        for image_id in ("computed", "multihash", "legacy"):
            assert not cache.is_cached(image_id)
            assert cache.get_cached_image(image_id) is None
            assert (cache_dir / "invalid" / image_id).stat().st_size == MiB
        assert cache.get_cache_size() == 0
        assert scrubber.quarantined == 3


def test_entries_without_a_hash_get_one_recorded_and_missing_ones(
    make_settings: Callable[..., Settings],
) -> None:
    with ImageCache(make_settings()) as cache:
        path = cache.driver.layout.active_path("bare")
        path.write_bytes(b"b" * 100)
        cache.driver.record_image(CachedImage("bare", 100, 3, 1.0, 1.0))
        scrubber = Scrubber(cache, bytes_per_second=0)
        assert scrubber.verify("bare") == (ScrubOutcome.HASHED, 100)
        record = cache.get_cached_image("bare")
        assert record is not None
        assert (record.hash_algo, record.hash_value, record.hits) == (
            "sha256",
            hashlib.sha256(b"b" * 100).hexdigest(),
            3,
        )
        assert scrubber.verify("bare") == (ScrubOutcome.OK, 100)  # and checked from now on
        assert scrubber.verify("nothing") == (ScrubOutcome.MISSING, 0)


def test_the_scrub_keeps_its_rate_and_stops(make_settings: Callable[..., Settings]) -> None:
    with ImageCache(make_settings()) as cache:
        _cache(cache, "one", b"1" * MiB)
        rate = 4 * MiB
        started = time.monotonic()
        outcome, read = Scrubber(cache, bytes_per_second=rate).verify("one")
        elapsed = time.monotonic() - started
        assert outcome is ScrubOutcome.OK
        assert read == MiB
        assert elapsed >= 0.8 * MiB / rate  # 1 MiB at 4 MiB/s: at least ~0.25 s

        stopped = Scrubber(cache, bytes_per_second=1)  # would take days
        stopped.stop()
        report = stopped.run()
        assert report.outcomes == {}
        assert cache.is_cached("one")
