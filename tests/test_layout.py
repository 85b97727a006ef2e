"""Image-id validation: the one gate between a caller's string and a path on disk."""

from __future__ import annotations

import contextlib
import os
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driver_kinds import settings_for
from imagecache import ImageCache, ImageInfo, InvalidImageId
from imagecache.drivers.base import Driver
from imagecache.errors import ImageCacheError
from imagecache.layout import MAX_ID_BYTES, CacheLayout, ImageId

BAD_IDS: list[object] = [
    "../x",
    "..",
    ".",
    "a/b",
    "/etc/passwd",
    "",
    "a\x00b",
    "x" * (MAX_ID_BYTES + 1),
    "é" * 128,  # 256 bytes in UTF-8, though only 128 characters
    "incomplete",
    "invalid",
    "queue",
    "cache.db",
    "cache.db-wal",
    ".hidden",
    ".locks",
    "-rf",
    "~user",
    "a b",
    "a\nb",
    "a\\b",
    None,
    42,
    b"bytes",
]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: any change on disk shows."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st_ = path.lstat()
            found[str(path.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return found


@pytest.fixture
def cache(driver_kind: str, tmp_path: Path) -> Iterator[ImageCache]:
    # The cache directory sits inside a wider tree so that an escape through
    # ".." would land somewhere the tree snapshot can see.
    cache_dir = tmp_path / "root" / "cache"
    cache_dir.mkdir(parents=True)
    with ImageCache(settings_for(driver_kind, cache_dir, tmp_path)) as image_cache:
        image_cache.cache_image_iter("existing", [b"data"])
        image_cache.queue_image("queued")
        yield image_cache


def _facade_calls(cache: ImageCache) -> dict[str, Callable[[Any], object]]:
    """Every entry point of the facade that takes an image id, as a one-argument call."""
    return {
        "is_cached": cache.is_cached,
        "is_being_cached": cache.is_being_cached,
        "is_cacheable": cache.is_cacheable,
        "is_queued": cache.is_queued,
        "queue_image": cache.queue_image,
        "delete_cached_image": cache.delete_cached_image,
        "delete_queued_image": cache.delete_queued_image,
        "get_image_size": cache.get_image_size,
        "get_hit_count": cache.get_hit_count,
        "get_cached_image": cache.get_cached_image,
        "pin": cache.pin,
        "unpin": cache.unpin,
        "open_for_read": lambda i: cache.open_for_read(i).__enter__(),
        "writer": cache.writer,
        "should_cache": lambda i: cache.should_cache(i, None),
        "get_caching_iter": lambda i: list(cache.get_caching_iter(i, [b"evil"])),
        "cache_image_iter": lambda i: cache.cache_image_iter(i, [b"evil"], ImageInfo("x")),
    }


def _driver_calls(driver: Driver) -> dict[str, Callable[[Any], object]]:
    """Every driver method that takes an image id: drivers check ids too."""

    def write(image_id: Any) -> None:
        with driver.open_for_write(image_id) as target:
            target.write(b"evil")

    def read(image_id: Any) -> None:
        with driver.open_for_read(image_id) as handle:
            handle.read()

    return {
        "is_cached": driver.is_cached,
        "is_being_cached": driver.is_being_cached,
        "is_cacheable": driver.is_cacheable,
        "is_queued": driver.is_queued,
        "queue_image": driver.queue_image,
        "delete_cached_image": driver.delete_cached_image,
        "delete_queued_image": driver.delete_queued_image,
        "get_image_size": driver.get_image_size,
        "get_hit_count": driver.get_hit_count,
        "get_cached_image": driver.get_cached_image,
        "set_pinned": lambda i: driver.set_pinned(i, True),
        "record_hit": driver.record_hit,
        "get_image_filepath": driver.get_image_filepath,
        "open_for_write": write,
        "open_for_read": read,
    }


def _assert_all_refuse(calls: dict[str, Callable[[Any], object]], bad_id: object) -> None:
    for name, call in calls.items():
        try:
            call(bad_id)
        except InvalidImageId:
            continue
        pytest.fail(f"{name} accepted {bad_id!r}")


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_bad_ids_are_refused_by_the_facade_and_touch_nothing(
    cache: ImageCache, tmp_path: Path, bad_id: object
) -> None:
    before = tree(tmp_path)
    _assert_all_refuse(_facade_calls(cache), bad_id)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_bad_ids_are_refused_by_the_driver_and_touch_nothing(
    cache: ImageCache,
    tmp_path: Path,
    bad_id: object,
    driver_kind: str,
) -> None:
    before = tree(tmp_path)
    _assert_all_refuse(_driver_calls(cache.driver), bad_id)
    assert tree(tmp_path) == before


def test_the_error_names_the_id_and_the_reason() -> None:
    layout = CacheLayout(Path("/nonexistent"))
    with pytest.raises(InvalidImageId, match=r"'\.\./x'.*letters, digits"):
        layout.validate("../x")
    with pytest.raises(InvalidImageId, match="longer than 255 bytes"):
        layout.validate("x" * 300)
    with pytest.raises(InvalidImageId, match="uses for itself"):
        layout.validate("incomplete")
    with pytest.raises(InvalidImageId, match="must be a string"):
        layout.validate(7)
    # A huge id is shortened in the message, never echoed whole into a log.
    with pytest.raises(InvalidImageId) as caught:
        layout.validate("y" * 10_000)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    "good_id",
    ["a", "0", "3f2d9c1e-8b7a-4c21-9e0f-1a2b3c4d5e6f", "cirros-0.6.2.img", "x" * MAX_ID_BYTES],
)
def test_good_ids_pass_unchanged(good_id: str) -> None:
    assert CacheLayout(Path("/c")).validate(good_id) == good_id


@given(st.one_of(st.text(max_size=300), st.text(alphabet=string.printable, max_size=40)))
def test_no_accepted_id_can_name_a_path_outside_the_cache(image_id: str) -> None:
    base = Path("/srv/cache")
    layout = CacheLayout(base)
    try:
        accepted = layout.validate(image_id)
    except InvalidImageId:
        return
    assert accepted == image_id
    for forbidden in ("/", "\x00", "\\"):
        assert forbidden not in image_id
    assert image_id not in {".", "..", "incomplete", "invalid", "queue", "cache.db"}
    assert not image_id.startswith(".")
    assert 0 < len(image_id.encode()) <= MAX_ID_BYTES
    for path in (layout.active_path(image_id), layout.incomplete_path(image_id)):
        resolved = Path(os.path.normpath(path))
        assert resolved.parent in (base, base / "incomplete")
        assert resolved.name == image_id


def test_the_gate_makes_an_image_id_that_accept_takes_as_is() -> None:
    layout = CacheLayout(Path("/c"))
    checked = layout.validate("img")
    assert type(checked) is ImageId
    assert checked == "img"
    assert layout.accept(checked) is checked
    assert type(layout.accept("img")) is ImageId  # a plain str goes through the gate
    with pytest.raises(InvalidImageId, match="letters, digits"):
        layout.accept("../x")


@pytest.mark.parametrize("entry", ["facade", "driver"])
def test_a_library_users_str_is_checked_once_per_call(
    cache: ImageCache, gate_calls: list[object], entry: str, driver_kind: str
) -> None:
    # The facade checks a plain str and hands the driver an ImageId, which the
    # driver does not check again; the driver's contract, called directly with
    # a plain str, checks it once too.
    calls = _facade_calls(cache) if entry == "facade" else _driver_calls(cache.driver)
    counts: dict[str, int] = {}
    for name, call in calls.items():
        gate_calls.clear()
        with contextlib.suppress(ImageCacheError):  # not cached: asked all the same
            call(f"img-{name}")
        counts[name] = len(gate_calls)
    assert counts == dict.fromkeys(calls, 1)
