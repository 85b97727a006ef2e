"""``FillWriter``: the hash of a fill runs one chunk behind its writes and still sees every byte.

Large chunks are hashed in another thread while the next ones are written;
small ones are hashed inline. Mixed in any order, the digest must be that of
the bytes in order, and verification at ``finish`` must still catch a wrong
promise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagecache import ImageCache
from imagecache.drivers.files import WRITEBACK_STEP, Fill
from imagecache.errors import VerificationError
from imagecache.records import ImageInfo
from imagecache.settings import Settings
from server_helpers import image_bytes, listdir

KiB = 1024
# Big chunks go to the hash thread, small ones are hashed inline, in between.
SIZES = [1024 * KiB, 3, 300 * KiB, 256 * KiB, 17, 2048 * KiB, 255 * KiB, 512 * KiB]


@pytest.fixture
def cache(make_settings: Callable[..., Settings]) -> Iterator[ImageCache]:
    with ImageCache(make_settings()) as image_cache:
        yield image_cache


def _chunks() -> list[bytes]:
    return [image_bytes(size, seed=i) for i, size in enumerate(SIZES)]


def test_mixed_chunks_are_hashed_in_order_and_committed(cache: ImageCache, cache_dir: Path) -> None:
    chunks = _chunks()
    data = b"".join(chunks)
    expected = hashlib.sha512(data).hexdigest()
    info = ImageInfo("img", size=len(data), hash_algo="sha512", hash_value=expected)
    writer = cache.writer("img", info)
    assert writer.open()
    for chunk in chunks:
        writer.write(chunk)
    writer.finish()
    assert writer.committed
    assert (cache_dir / "img").read_bytes() == data
    record = cache.get_cached_image("img")
    assert record is not None
    assert (record.hash_algo, record.hash_value) == ("sha512", expected)


def test_a_wrong_promise_is_caught_at_finish_and_rolled_back(
    cache: ImageCache, cache_dir: Path
) -> None:
    chunks = _chunks()
    # The right hash of the same bytes in another order: only an in-order digest fails it.
    swapped = hashlib.sha512(b"".join([chunks[1], chunks[0], *chunks[2:]])).hexdigest()
    size = sum(SIZES)
    info = ImageInfo("img", size=size, hash_algo="sha512", hash_value=swapped)
    writer = cache.writer("img", info)
    assert writer.open()
    for chunk in chunks:
        writer.write(chunk)
    with pytest.raises(VerificationError) as raised:
        writer.finish()
    writer.abort(raised.value)
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "invalid") == ["img"]


def test_abort_mid_fill_waits_for_the_hash_and_rolls_back(
    cache: ImageCache, cache_dir: Path
) -> None:
    writer = cache.writer("img", ImageInfo("img", size=sum(SIZES)))
    assert writer.open()
    for chunk in _chunks()[:3]:
        writer.write(chunk)
    writer.abort(ConnectionResetError("the origin went away"))
    assert writer._hashing is None
    assert not (cache_dir / "img").exists()
    assert listdir(cache_dir / "invalid") == ["img"]


def test_a_long_fill_starts_writeback_as_it_goes(cache: ImageCache, cache_dir: Path) -> None:
    chunk = image_bytes(1024 * KiB, seed=9)
    count = 2 * WRITEBACK_STEP // len(chunk) + 3
    data = chunk * count
    writer = cache.writer("img", ImageInfo("img", size=len(data)))
    assert writer.open()
    fill = writer._target
    assert isinstance(fill, Fill)
    for _ in range(count):
        writer.write(chunk)
    # Asked of the kernel twice on the way, for every whole step written.
    assert fill._written_back == 2 * WRITEBACK_STEP
    writer.finish()
    assert writer.committed
    assert (cache_dir / "img").read_bytes() == data
