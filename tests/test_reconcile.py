"""Start-up reconciliation over a deliberately inconsistent cache directory."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from driver_kinds import settings_for
from imagecache import CachedImage, ImageCache
from imagecache.reconcile import reconcile


@pytest.mark.parametrize("kind", ["sqlite", "xattr"])
def test_a_crafted_inconsistent_directory(kind: str, cache_dir: Path, tmp_path: Path) -> None:
    settings = settings_for(kind, cache_dir, tmp_path)
    with ImageCache(settings) as cache:
        assert cache.cache_image_iter("kept", [b"k" * 1000])
        assert cache.cache_image_iter("gone", [b"g" * 1000])
        assert cache.cache_image_iter("resized", [b"r" * 1000])
        # Rows the files no longer agree with: a file removed behind our back,
        # one that grew, an orphan file, an empty orphan, and a dead fill.
        (cache_dir / "gone").unlink()
        (cache_dir / "resized").write_bytes(b"r" * 1500)
        if kind == "sqlite":
            cache.driver.record_image(CachedImage("ghost", 5, 1, 1.0, 1.0))
        past = time.time() - 60
        (cache_dir / "orphan").write_bytes(b"o" * 700)
        os.utime(cache_dir / "orphan", (past, past))
        (cache_dir / "empty").write_bytes(b"")
        (cache_dir / "incomplete" / "dead").write_bytes(b"d" * 10)
        os.utime(cache_dir / "incomplete" / "dead", (past, past))
        (cache_dir / "incomplete" / "fresh").write_bytes(b"f")  # newer than start-up
        live = cache_dir / "incomplete" / "live"
        live.write_bytes(b"l")
        os.utime(live, (past, past))
        with open(live, "rb") as holder:
            fcntl.flock(holder, fcntl.LOCK_EX)  # a writer that is alive
            report = reconcile(cache, started_at=time.time() - 1)
            assert live.exists()
        live.unlink()

        assert report.stale_fills == 1
        assert (cache_dir / "invalid" / "dead").exists()
        assert (cache_dir / "incomplete" / "fresh").exists()
        assert report.rejected == 1
        assert (cache_dir / "invalid" / "empty").exists()
        images = {image.image_id: image for image in cache.get_cached_images()}
        assert set(images) == {"kept", "orphan", "resized"}
        assert images["orphan"].hits == 0
        assert images["orphan"].size == 700
        assert images["orphan"].last_accessed == pytest.approx(past)
        assert images["resized"].size == 1500
        assert cache.get_cache_size() == 1000 + 700 + 1500

        # Consistent now: a second pass finds nothing.
        assert not reconcile(cache, started_at=time.time() - 1).changed
