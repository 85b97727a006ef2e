"""The smallest end-to-end check of the library: cache, read back, verify."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from imagecache import ImageCache, ImageInfo, Settings


def test_cache_and_read_back(make_settings: Callable[..., Settings]) -> None:
    data = b"imagecache" * 100_000
    info = ImageInfo("smoke", size=len(data), checksum=hashlib.md5(data).hexdigest())
    with ImageCache(make_settings()) as cache:
        assert cache.cache_image_iter("smoke", [data[:4096], data[4096:]], info)
        with cache.open_for_read("smoke") as handle:
            assert handle.read() == data
        assert cache.get_hit_count("smoke") == 1
