"""The driver contract (DESIGN §3) and the facade over it (§4), once for every driver kind.

Each test runs against every kind in ``tests/driver_kinds.py``, on a real cache
directory; nothing here knows which driver it talks to.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from driver_kinds import settings_for
from imagecache import (
    BadDriverConfiguration,
    ImageBeingCached,
    ImageCache,
    ImageInfo,
    ImageNotCached,
    NotInClusterMode,
    QueueResult,
    Settings,
    UpstreamError,
    VerificationError,
    create_driver,
)
from imagecache.drivers.base import Driver, WriteTarget

KiB = 1024
DAY = 86400


@pytest.fixture
def settings(driver_kind: str, cache_dir: Path, tmp_path: Path) -> Settings:
    return settings_for(driver_kind, cache_dir, tmp_path)


@pytest.fixture
def cache(settings: Settings) -> Iterator[ImageCache]:
    with ImageCache(settings) as image_cache:
        yield image_cache


@pytest.fixture
def driver(cache: ImageCache) -> Driver:
    return cache.driver


def put(cache: ImageCache, image_id: str, data: bytes = b"*" * KiB) -> None:
    info = ImageInfo(image_id, size=len(data))
    assert cache.cache_image_iter(image_id, [data], info), f"{image_id} was not cached"


def read(cache: ImageCache, image_id: str) -> bytes:
    with cache.open_for_read(image_id) as handle:
        return handle.read()


def names(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()} if directory.exists() else set()


def chunks_of(data: bytes, size: int = 100) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def make_incomplete(cache_dir: Path, image_id: str, age: float = 0.0) -> Path:
    """An incomplete file no live writer holds, ``age`` seconds old."""
    path = cache_dir / "incomplete" / image_id
    path.write_bytes(b"partial")
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))
    return path


def wrap_open_for_write(
    monkeypatch: pytest.MonkeyPatch, driver: Driver, on_open: Callable[[WriteTarget], None]
) -> None:
    """Run ``on_open`` on every fill target right after the driver opened it."""
    real = driver.open_for_write

    @contextlib.contextmanager
    def patched(image_id: str) -> Iterator[WriteTarget]:
        with real(image_id) as target:
            on_open(target)
            yield target

    monkeypatch.setattr(driver, "open_for_write", patched)


# --- set-up -------------------------------------------------------------------------------------


def test_set_paths_creates_the_working_directories(driver: Driver, cache_dir: Path) -> None:
    for sub in ("incomplete", "invalid", "queue"):
        assert (cache_dir / sub).is_dir()


def test_missing_cache_dir_names_the_setting(settings: Settings) -> None:
    with pytest.raises(BadDriverConfiguration, match="image_cache_dir"):
        create_driver(settings.replace(image_cache_dir=None))


# --- state --------------------------------------------------------------------------------------


def test_iter_sizes_lists_every_record_pinned_or_not(cache: ImageCache, driver: Driver) -> None:
    assert list(driver.iter_sizes()) == []
    put(cache, "small", b"x" * 10)
    put(cache, "big", b"y" * 3000)
    assert cache.pin("big")
    assert sorted(driver.iter_sizes()) == [("big", 3000), ("small", 10)]
    assert sorted(driver.iter_sizes()) == sorted(
        (image.image_id, image.size) for image in driver.get_cached_images()
    )


def test_states_of_an_unknown_image(driver: Driver) -> None:
    assert not driver.is_cached("img")
    assert not driver.is_being_cached("img")
    assert driver.is_cacheable("img")
    assert not driver.is_queued("img")
    assert driver.get_hit_count("img") == 0
    assert driver.get_cached_image("img") is None
    with pytest.raises(ImageNotCached):
        driver.get_image_size("img")
    with pytest.raises(ImageNotCached), driver.open_for_read("img"):
        pass


def test_states_while_filling_and_after_commit(driver: Driver, cache_dir: Path) -> None:
    with driver.open_for_write("img") as target:
        target.write(b"abc")
        assert driver.is_being_cached("img")
        assert not driver.is_cached("img")
        assert not driver.is_cacheable("img")
    assert driver.is_cached("img")
    assert not driver.is_being_cached("img")
    assert not driver.is_cacheable("img")
    assert driver.get_image_size("img") == 3
    assert names(cache_dir / "incomplete") == set()
    assert names(cache_dir / "invalid") == set()


def test_open_for_write_commits_a_fresh_entry_as_recently_accessed(driver: Driver) -> None:
    before = time.time()
    with driver.open_for_write("img") as target:
        target.write(b"a")
    after = time.time()
    (image,) = driver.get_cached_images()
    assert image.image_id == "img"
    assert image.size == 1
    assert image.hits == 0
    assert before - 1 <= image.last_modified <= after + 1
    # A new entry is not the first to be evicted: it counts as accessed now.
    assert before - 1 <= image.last_accessed <= after + 1


def test_open_for_write_with_an_exception_rolls_back_to_invalid(
    driver: Driver, cache_dir: Path
) -> None:
    def fail_midway() -> None:
        with driver.open_for_write("img") as target:
            target.write(b"half")
            raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        fail_midway()
    assert not driver.is_cached("img")
    assert names(cache_dir / "incomplete") == set()
    assert names(cache_dir / "invalid") == {"img"}
    assert driver.get_cache_size() == 0


def test_second_concurrent_writer_gets_image_being_cached(driver: Driver) -> None:
    with driver.open_for_write("img") as target:
        target.write(b"first")
        with pytest.raises(ImageBeingCached), driver.open_for_write("img"):
            pass
    assert read_driver(driver, "img") == b"first"


def test_writer_in_another_thread_blocks_a_second_writer(driver: Driver) -> None:
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def fill() -> None:
        try:
            with driver.open_for_write("img") as target:
                target.write(b"from thread")
                started.set()
                assert release.wait(10)
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    thread = threading.Thread(target=fill)
    thread.start()
    try:
        assert started.wait(10)
        with pytest.raises(ImageBeingCached), driver.open_for_write("img"):
            pass
    finally:
        release.set()
        thread.join(10)
    assert errors == []
    assert read_driver(driver, "img") == b"from thread"


def test_stale_incomplete_file_of_a_dead_writer_is_taken_over(
    driver: Driver, cache_dir: Path
) -> None:
    # No process holds a lock on it: its writer is gone.
    make_incomplete(cache_dir, "img")
    assert driver.is_being_cached("img")
    with driver.open_for_write("img") as target:
        target.write(b"fresh")
    assert read_driver(driver, "img") == b"fresh"  # none of the stale bytes survive
    assert names(cache_dir / "incomplete") == set()


def read_driver(driver: Driver, image_id: str) -> bytes:
    with driver.open_for_read(image_id) as handle:
        return handle.read()


# --- reads --------------------------------------------------------------------------------------


def test_open_for_read_counts_a_hit_once_the_read_completes(driver: Driver) -> None:
    with driver.open_for_write("img") as target:
        target.write(b"data")
    committed = driver.get_cached_image("img")
    assert committed is not None
    with driver.open_for_read("img") as handle:
        assert handle.read() == b"data"
        assert driver.get_hit_count("img") == 0
    assert driver.get_hit_count("img") == 1
    image = driver.get_cached_image("img")
    assert image is not None
    assert image.last_accessed >= committed.last_accessed


def test_a_read_that_fails_counts_no_hit(driver: Driver) -> None:
    with driver.open_for_write("img") as target:
        target.write(b"data")
    with pytest.raises(RuntimeError), driver.open_for_read("img"):
        raise RuntimeError("client went away")
    assert driver.get_hit_count("img") == 0


# --- listings -----------------------------------------------------------------------------------


def test_get_cached_images_is_ordered_by_id_with_every_field(cache: ImageCache) -> None:
    for image_id in ("c", "a", "b"):
        put(cache, image_id, image_id.encode() * 10)
    read(cache, "b")
    listed = cache.get_cached_images()
    assert [image.image_id for image in listed] == ["a", "b", "c"]
    assert [image.size for image in listed] == [10, 10, 10]
    assert [image.hits for image in listed] == [0, 1, 0]
    now = time.time()
    for image in listed:
        assert now - 60 < image.last_modified <= now + 1
        assert image.last_accessed >= image.last_modified
        assert image.as_dict()["image_id"] == image.image_id


def test_get_least_recently_accessed(cache: ImageCache) -> None:
    assert cache.driver.get_least_recently_accessed() is None
    put(cache, "old", b"x" * 7)
    put(cache, "new", b"y" * 3)
    assert cache.driver.get_least_recently_accessed() == ("old", 7)
    read(cache, "old")
    assert cache.driver.get_least_recently_accessed() == ("new", 3)


def test_cache_size_counts_committed_images_only(cache: ImageCache, cache_dir: Path) -> None:
    assert cache.get_cache_size() == 0
    put(cache, "one", b"1" * 100)
    put(cache, "two", b"2" * 50)
    make_incomplete(cache_dir, "filling")
    (cache_dir / "invalid" / "broken").write_bytes(b"b" * 1000)
    cache.queue_image("queued")
    (cache_dir / ".hidden").write_bytes(b"h" * 1000)
    assert cache.get_cache_size() == 150
    assert sum(image.size for image in cache.get_cached_images()) == 150
    assert [image.image_id for image in cache.get_cached_images()] == ["one", "two"]


def test_get_cached_nodes_needs_cluster_mode(driver_kind: str, driver: Driver) -> None:
    if driver_kind.startswith("central"):
        pytest.skip("the central driver answers get_cached_nodes; covered by its own tests")
    with pytest.raises(NotInClusterMode):
        driver.get_cached_nodes("img")


# --- queue --------------------------------------------------------------------------------------


def test_queue_answers(cache: ImageCache, cache_dir: Path) -> None:
    assert cache.queue_image("img") is QueueResult.QUEUED
    assert cache.is_queued("img")
    assert not cache.is_cached("img")
    again = cache.queue_image("img")
    assert again is QueueResult.ALREADY_QUEUED
    assert not again  # the seed's bool still reads right

    put(cache, "img")
    assert not cache.is_queued("img"), "a committed fill removes its queue marker"
    assert cache.queue_image("img") is QueueResult.ALREADY_CACHED

    make_incomplete(cache_dir, "filling")
    assert cache.is_being_cached("filling")
    assert cache.queue_image("filling") is QueueResult.BEING_CACHED
    assert not cache.is_queued("filling")
    assert cache.get_queued_images() == []


def test_queue_order_is_preserved(cache: ImageCache) -> None:
    order = ["2", "0", "b", "1", "a"]
    for image_id in order:
        assert cache.queue_image(image_id)
    assert cache.get_queued_images() == order


def test_queue_deletion_is_idempotent(cache: ImageCache) -> None:
    for image_id in ("a", "b", "c"):
        cache.queue_image(image_id)
    assert cache.delete_queued_image("b") is True
    assert cache.delete_queued_image("b") is False
    assert cache.get_queued_images() == ["a", "c"]
    assert cache.delete_all_queued_images() == 2
    assert cache.delete_all_queued_images() == 0
    assert cache.get_queued_images() == []


# --- deletion -----------------------------------------------------------------------------------


def test_delete_cached_image_is_idempotent(cache: ImageCache) -> None:
    put(cache, "img")
    assert cache.delete_cached_image("img") is True
    assert cache.delete_cached_image("img") is False
    assert not cache.is_cached("img")
    assert cache.get_cached_images() == []
    assert cache.get_cache_size() == 0


def test_delete_of_a_file_that_vanished_is_not_an_error(cache: ImageCache, cache_dir: Path) -> None:
    put(cache, "img")
    (cache_dir / "img").unlink()  # someone removed it behind our back
    assert cache.delete_cached_image("img") is False
    assert cache.get_cached_images() == []
    assert cache.get_cache_size() == 0


def test_delete_all_cached_images(cache: ImageCache, cache_dir: Path, settings: Settings) -> None:
    put(cache, "a")
    put(cache, "b")
    cache.queue_image("q")
    assert cache.delete_all_cached_images() == 2
    assert cache.delete_all_cached_images() == 0
    assert cache.get_cached_images() == []
    assert cache.get_queued_images() == ["q"], "deleting images leaves the queue alone"
    assert (cache_dir / settings.image_cache_sqlite_db).exists() or (
        settings.image_cache_driver != "sqlite"
    )


# --- clean --------------------------------------------------------------------------------------


def test_clean_removes_invalid_files(cache: ImageCache, cache_dir: Path) -> None:
    (cache_dir / "invalid" / "broken").write_bytes(b"b")
    result = cache.clean()
    assert result.invalid == 1
    assert names(cache_dir / "invalid") == set()


def test_clean_with_stall_zero_removes_every_dead_fill(cache: ImageCache, cache_dir: Path) -> None:
    make_incomplete(cache_dir, "fresh")
    result = cache.clean(stall_time=0)
    assert result.stalled == 1
    assert names(cache_dir / "incomplete") == set()
    assert cache.is_cacheable("fresh")


def test_clean_with_default_stall_time(
    cache: ImageCache, cache_dir: Path, settings: Settings
) -> None:
    assert settings.image_cache_stall_time == DAY
    make_incomplete(cache_dir, "stalled", age=2 * DAY)
    make_incomplete(cache_dir, "fresh")
    assert cache.clean().stalled == 1
    assert names(cache_dir / "incomplete") == {"fresh"}


def test_clean_with_custom_stall_time(cache: ImageCache, cache_dir: Path) -> None:
    make_incomplete(cache_dir, "day-old", age=DAY)
    make_incomplete(cache_dir, "fresh")
    assert cache.clean(stall_time=3600).stalled == 1
    assert names(cache_dir / "incomplete") == {"fresh"}


def test_clean_never_removes_a_live_writers_fill(cache: ImageCache, cache_dir: Path) -> None:
    with cache.driver.open_for_write("img") as target:
        target.write(b"still coming")
        # Old by the clock, but its writer holds the lock: not stalled.
        stamp = time.time() - 2 * DAY
        os.utime(cache_dir / "incomplete" / "img", (stamp, stamp))
        assert cache.clean(stall_time=0).stalled == 0
        assert names(cache_dir / "incomplete") == {"img"}
        target.write(b"!")
    assert read(cache, "img") == b"still coming!"


# --- prune --------------------------------------------------------------------------------------


def test_prune_evicts_least_recently_read_and_spares_fresh_entries(cache: ImageCache) -> None:
    ten = [str(n) for n in range(10)]
    for image_id in ten:
        put(cache, image_id)
    for image_id in ten:
        read(cache, image_id)
    put(cache, "99")  # cached after every read, never read itself
    assert cache.get_cache_size() == 11 * KiB

    files, freed = cache.prune(max_size=5 * KiB)

    # 11 KiB down to 5 KiB takes six evictions: the six oldest reads go.
    assert (files, freed) == (6, 6 * KiB)
    assert cache.get_cache_size() == 5 * KiB
    kept = {image.image_id for image in cache.get_cached_images()}
    assert kept == {"6", "7", "8", "9", "99"}
    for image_id in ("0", "1", "2", "3", "4", "5"):
        assert not cache.is_cached(image_id)


def test_prune_to_zero_empties_the_cache(cache: ImageCache) -> None:
    for n in range(5):
        put(cache, f"img{n}")
    assert cache.prune(max_size=0) == (5, 5 * KiB)
    assert cache.get_cached_images() == []
    assert cache.get_cache_size() == 0
    assert cache.prune(max_size=0) == (0, 0)


def test_prune_under_the_limit_does_nothing(cache: ImageCache) -> None:
    put(cache, "img")
    assert cache.prune() == (0, 0)  # default limit: 10 GiB
    assert cache.is_cached("img")


def test_pinned_images_are_exempt_from_prune(cache: ImageCache) -> None:
    put(cache, "golden")
    put(cache, "other")
    assert cache.pin("golden") is True
    assert cache.pin("missing") is False
    assert cache.prune(max_size=0) == (1, KiB)
    assert [image.image_id for image in cache.get_cached_images()] == ["golden"]
    assert cache.get_cached_images()[0].pinned
    assert cache.driver.get_least_recently_accessed() is None

    assert cache.unpin("golden") is True
    assert cache.prune(max_size=0) == (1, KiB)
    assert cache.get_cached_images() == []


# --- the facade: tee, verify, failures ------------------------------------------------------


DATA = bytes(range(256)) * 40  # 10 KiB, 103 chunks of 100 bytes
MD5 = hashlib.md5(DATA).hexdigest()
SHA512 = hashlib.sha512(DATA).hexdigest()
SHA256 = hashlib.sha256(DATA).hexdigest()


def consume(iterator: Iterator[bytes]) -> tuple[bytes, BaseException | None]:
    """Everything the consumer received, and the error that ended the stream if any."""
    received = bytearray()
    try:
        for chunk in iterator:
            received += chunk
    except Exception as exc:
        return bytes(received), exc
    return bytes(received), None


def assert_not_cached_and_clean(cache: ImageCache, cache_dir: Path, image_id: str) -> None:
    assert not cache.is_cached(image_id)
    assert names(cache_dir / "incomplete") == set()
    assert cache.get_cached_images() == []
    assert not (cache_dir / image_id).exists()


def test_caching_iterator_yields_every_chunk_and_commits(
    cache: ImageCache, cache_dir: Path
) -> None:
    source = chunks_of(DATA)
    received = list(cache.get_caching_iter("img", iter(source), ImageInfo("img", size=len(DATA))))
    assert received == source
    assert read(cache, "img") == DATA
    assert names(cache_dir / "incomplete") == set()


@pytest.mark.parametrize(
    "info",
    [
        pytest.param(ImageInfo("img", size=len(DATA), checksum=MD5), id="md5"),
        pytest.param(ImageInfo("img", hash_algo="sha512", hash_value=SHA512), id="sha512"),
        pytest.param(ImageInfo("img", hash_algo="sha256", hash_value=SHA256), id="sha256"),
        pytest.param(
            ImageInfo("img", checksum=MD5, hash_algo="sha512", hash_value=SHA512.upper()),
            id="md5+sha512-uppercase",
        ),
    ],
)
def test_good_hash_is_cached_and_recorded(cache: ImageCache, info: ImageInfo) -> None:
    received, error = consume(cache.get_caching_iter("img", iter(chunks_of(DATA)), info))
    assert error is None
    assert received == DATA
    image = cache.get_cached_image("img")
    assert image is not None
    if info.hash_algo:
        assert image.hash_algo == info.hash_algo
        assert image.hash_value == (info.hash_value or "").lower()
    if info.checksum:
        assert image.checksum == MD5


@pytest.mark.parametrize(
    "info",
    [
        pytest.param(ImageInfo("img", checksum="0" * 32), id="md5"),
        pytest.param(ImageInfo("img", hash_algo="sha512", hash_value="0" * 128), id="sha512"),
        pytest.param(ImageInfo("img", hash_algo="sha256", hash_value="0" * 64), id="sha256"),
        # A correct md5 does not rescue a wrong sha512: the strongest hash decides.
        pytest.param(
            ImageInfo("img", checksum=MD5, hash_algo="sha512", hash_value="0" * 128),
            id="good-md5-bad-sha512",
        ),
        pytest.param(ImageInfo("img", size=len(DATA) + 1), id="size-short"),
        pytest.param(ImageInfo("img", size=len(DATA) - 1), id="size-long"),
    ],
)
def test_mismatch_raises_to_the_consumer_and_moves_the_file_to_invalid(
    cache: ImageCache, cache_dir: Path, info: ImageInfo
) -> None:
    received, error = consume(cache.get_caching_iter("img", iter(chunks_of(DATA)), info))
    assert isinstance(error, VerificationError)
    # Never a complete but wrong body: the last chunk is held back.
    assert len(received) < len(DATA)
    assert_not_cached_and_clean(cache, cache_dir, "img")
    assert names(cache_dir / "invalid") == {"img"}


def test_backend_failure_mid_stream_reaches_the_consumer(
    cache: ImageCache, cache_dir: Path
) -> None:
    def broken_upstream() -> Iterator[bytes]:
        yield DATA[:100]
        yield DATA[100:200]
        raise UpstreamError("connection reset by origin")

    received, error = consume(cache.get_caching_iter("img", broken_upstream()))
    assert isinstance(error, UpstreamError)
    assert received == DATA[:100]
    assert_not_cached_and_clean(cache, cache_dir, "img")


def test_iterator_abandoned_after_one_chunk_rolls_back(cache: ImageCache, cache_dir: Path) -> None:
    iterator = cache.get_caching_iter(
        "img", iter(chunks_of(DATA)), ImageInfo("img", size=len(DATA))
    )
    assert next(iterator) == DATA[:100]
    iterator.close()  # what a consumer that stops early does, explicitly or via gc
    assert_not_cached_and_clean(cache, cache_dir, "img")
    assert names(cache_dir / "invalid") == {"img"}
    # And the image can be cached afterwards.
    put(cache, "img", DATA)
    assert read(cache, "img") == DATA


def test_open_failure_on_the_cache_side_still_streams_every_byte(
    cache: ImageCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: the tests run as root, so a read-only incomplete/ would not make
    # the real open fail; raise the OSError that open would.
    def refuse(image_id: str) -> contextlib.AbstractContextManager[WriteTarget]:
        raise OSError(errno.EACCES, "Permission denied", str(cache_dir / "incomplete" / image_id))

    monkeypatch.setattr(cache.driver, "open_for_write", refuse)
    source = chunks_of(DATA)
    info = ImageInfo("img", size=len(DATA), checksum=MD5)
    assert list(cache.get_caching_iter("img", iter(source), info)) == source
    assert_not_cached_and_clean(cache, cache_dir, "img")


def test_open_failure_still_verifies(
    cache: ImageCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(image_id: str) -> contextlib.AbstractContextManager[WriteTarget]:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache.driver, "open_for_write", refuse)
    info = ImageInfo("img", checksum="0" * 32)
    _, error = consume(cache.get_caching_iter("img", iter(chunks_of(DATA)), info))
    assert isinstance(error, VerificationError)


def test_disk_full_mid_fill_still_streams_every_byte(
    cache: ImageCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []

    def fill_the_disk(target: WriteTarget) -> None:
        # The write that fails is the real one into a real ENOSPC: the fill's fd
        # is pointed at /dev/full (no spare small filesystem can be mounted here).
        # This replaces the locked descriptor, which is fine for one writer.
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, target.fileno())
        os.close(full)
        written.append(target.fileno())

    wrap_open_for_write(monkeypatch, cache.driver, fill_the_disk)
    source = chunks_of(DATA)
    info = ImageInfo("img", size=len(DATA), hash_algo="sha512", hash_value=SHA512)
    assert list(cache.get_caching_iter("img", iter(source), info)) == source
    assert written, "the fill was opened"
    assert_not_cached_and_clean(cache, cache_dir, "img")
    assert names(cache_dir / "invalid") == {"img"}

    monkeypatch.undo()
    put(cache, "img", DATA)
    assert read(cache, "img") == DATA


def test_cache_image_file_and_cache_image_iter(cache: ImageCache, tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(DATA)
    with source.open("rb") as handle:
        assert cache.cache_image_file("from-file", handle, ImageInfo("from-file", checksum=MD5))
    assert read(cache, "from-file") == DATA
    assert cache.cache_image_iter("from-iter", iter(chunks_of(DATA)))
    assert read(cache, "from-iter") == DATA
    # Already cached: nothing to do.
    assert cache.cache_image_iter("from-iter", iter(chunks_of(DATA))) is False


def test_caching_over_a_stale_fill_takes_it_over(cache: ImageCache, cache_dir: Path) -> None:
    make_incomplete(cache_dir, "img", age=DAY)
    assert cache.cache_image_iter("img", iter(chunks_of(DATA)), ImageInfo("img", checksum=MD5))
    assert read(cache, "img") == DATA
    assert names(cache_dir / "incomplete") == set()


def test_taking_over_a_stale_fill_starts_a_new_file(cache: ImageCache, cache_dir: Path) -> None:
    # A reader of the dead writer's file (a follower in another process) must
    # keep the bytes it was sent: the takeover may not rewrite that file.
    stale = make_incomplete(cache_dir, "img", age=DAY)
    reader = os.open(stale, os.O_RDONLY)
    try:
        assert cache.cache_image_iter("img", iter(chunks_of(DATA)), ImageInfo("img", checksum=MD5))
        assert os.pread(reader, 100, 0) == b"partial"
        assert os.fstat(reader).st_ino != (cache_dir / "img").stat().st_ino
    finally:
        os.close(reader)
    assert read(cache, "img") == DATA


def test_caching_while_another_writer_fills_streams_without_caching(cache: ImageCache) -> None:
    with cache.driver.open_for_write("img") as target:
        target.write(DATA)
        source = chunks_of(DATA)
        assert list(cache.get_caching_iter("img", iter(source))) == source
        assert cache.cache_image_iter("img", iter(source)) is False
    assert read(cache, "img") == DATA
