"""The hard size limit: room is reserved before a fill, never overshot while filling."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from imagecache import ImageCache, ImageInfo, Settings
from imagecache.capacity import Admission, Capacity
from imagecache.server.state import STATE
from imagecache.upstreams.base import ANONYMOUS
from server_helpers import directory_app, poll, put_image, settled

MiB = 1024 * 1024
CHUNK = 256 * 1024


def _data(i: int, scale: int = 1) -> bytes:
    size = (1 + i % 4) * MiB * scale - i  # 1..4 MiB (times scale), all different
    return hashlib.sha256(str(i).encode()).digest() * (size // 32) + b"x" * (size % 32)


def _fill(cache: ImageCache, capacity: Capacity, image_id: str, data: bytes) -> Admission:
    info = ImageInfo(
        image_id, size=len(data), hash_algo="sha256", hash_value=hashlib.sha256(data).hexdigest()
    )
    with capacity.reserved(image_id, info.size) as reservation:
        if not reservation.admission:
            return reservation.admission
        writer = cache.writer(image_id, info)
        assert writer.open()
        for offset in range(0, len(data), CHUNK):
            writer.write(data[offset : offset + CHUNK])
        writer.finish()
        assert writer.committed
    return Admission.ADMITTED


def _bytes_on_disk(base: Path) -> int:
    """Committed plus incomplete bytes, as ``du`` of the cache would count them."""
    total = 0
    for directory in (base, base / "incomplete"):
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file() and not entry.name.startswith(("cache.db", ".")):
                        total += entry.stat().st_size
                except FileNotFoundError:
                    continue
    return total


def test_concurrent_fills_never_exceed_the_limit(
    make_settings: Callable[..., Settings], cache_dir: Path
) -> None:
    limit = 10 * MiB
    settings = make_settings(image_cache_max_size=limit, free_space_watermark=0)
    images = {f"img-{i}": _data(i) for i in range(24)}
    assert sum(map(len, images.values())) > 5 * limit
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        # Two directory scans are not one instant: an image evicted after the
        # first scan and a fill started before the second would both be
        # counted. Evictions and new reservations happen only under the
        # capacity lock, so holding it gives a true snapshot; fills keep writing
        # (inside their reservations) and committing meanwhile.
        while not stop.is_set():
            with cache.exclusive("capacity"):
                samples.append(_bytes_on_disk(cache_dir))

    # Two caches with a capacity each on one directory are what two worker
    # processes have; fills alternate between them, four at a time.
    with ImageCache(settings) as cache, ImageCache(settings) as other:
        capacities = [Capacity(cache), Capacity(other)]
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(4) as pool:
                outcomes = list(
                    pool.map(
                        lambda n, item: _fill(capacities[n % 2].cache, capacities[n % 2], *item),
                        range(len(images)),
                        images.items(),
                    )
                )
        finally:
            stop.set()
            sampler.join()
        # A fill that finds the limit promised to fills in flight streams
        # through uncached (no_space); most find room by evicting.
        assert set(outcomes) <= {Admission.ADMITTED, Admission.NO_SPACE}
        assert outcomes.count(Admission.ADMITTED) >= len(images) // 2
        assert sum(capacity.evictions for capacity in capacities) > 0
        assert all(capacity.reserved_bytes() == 0 for capacity in capacities)
        assert os.listdir(cache.driver.layout.reservation_dir) == []
        assert len(samples) > 10
        # Reservations cover whole images, so even with fills in flight the
        # directory stays under the limit itself (limit + in-flight is the promise).
        assert max(samples) <= limit, (max(samples), limit)
        assert cache.get_cache_size() <= limit
        # What survived eviction is intact.
        survivors = cache.get_cached_images()
        assert survivors
        for image in survivors:
            with cache.open_for_read(image.image_id) as handle:
                assert handle.read() == images[image.image_id]


def test_too_large_is_refused_and_pinned_images_stay(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        image_cache_max_size=4 * MiB, max_image_fraction=0.5, free_space_watermark=0
    )
    with ImageCache(settings) as cache:
        capacity = Capacity(cache)
        assert capacity.reserve("huge", 2 * MiB + 1).admission is Admission.TOO_LARGE
        assert _fill(cache, capacity, "golden", b"g" * (2 * MiB)) is Admission.ADMITTED
        assert cache.pin("golden")
        assert _fill(cache, capacity, "a", b"a" * (2 * MiB)) is Admission.ADMITTED
        # Room for b is made by evicting a (unpinned), never golden.
        assert _fill(cache, capacity, "b", b"b" * (2 * MiB)) is Admission.ADMITTED
        assert cache.is_cached("golden")
        assert not cache.is_cached("a")
        # With only pinned and in-flight bytes left, there is no room: bypass.
        assert cache.pin("b")
        no_room = capacity.reserve("c", MiB)
        assert no_room.admission is Admission.NO_SPACE
        assert no_room.evicted == ()
        assert cache.is_cached("b")


def test_the_free_space_watermark_refuses_without_evicting(
    make_settings: Callable[..., Settings], cache_dir: Path
) -> None:
    free = os.statvfs(cache_dir).f_bavail * os.statvfs(cache_dir).f_frsize
    with ImageCache(make_settings(free_space_watermark=0)) as cache:
        assert _fill(cache, Capacity(cache), "keep", b"k" * MiB) is Admission.ADMITTED
    # A watermark the disk cannot meet even with the cache emptied.
    settings = make_settings(free_space_watermark=free * 2)
    with ImageCache(settings) as cache:
        reservation = Capacity(cache).reserve("new", MiB)
        assert reservation.admission is Admission.NO_SPACE
        assert cache.is_cached("keep")


def test_reservations_of_fills_in_flight_count(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(image_cache_max_size=4 * MiB, free_space_watermark=0)
    with ImageCache(settings) as cache:
        capacity = Capacity(cache)
        first = capacity.reserve("one", 2 * MiB)
        second = capacity.reserve("two", 2 * MiB)
        assert first.admission is Admission.ADMITTED
        assert second.admission is Admission.ADMITTED
        # Nothing committed to evict, and 4 MiB are promised: no room for more.
        assert capacity.reserve("three", MiB).admission is Admission.NO_SPACE
        capacity.release(first)
        assert capacity.reserve("three", MiB).admission is Admission.ADMITTED


def test_a_reservation_of_zero_bytes_is_released_with_its_file_and_descriptor(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(free_space_watermark=0)
    with ImageCache(settings) as cache:
        capacity = Capacity(cache)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(5):
            with capacity.reserved("empty", 0) as reservation:
                assert reservation.admission is Admission.ADMITTED
                assert capacity.ledger.count() == 1
        assert capacity.ledger.count() == 0
        assert os.listdir(cache.driver.layout.reservation_dir) == []
        assert len(os.listdir("/proc/self/fd")) == before


def test_reservations_are_shared_by_every_process(make_settings: Callable[..., Settings]) -> None:
    """A second process sees room held by the first before its fill writes a byte.

    Two caches and capacities on one directory are what two worker processes
    have (their own objects, the directory in common); the ledger's locks are
    per open file, so they tell the two apart within one process as well.
    Counting only other processes' files in incomplete/, as before, let the
    two-worker soak (tests/test_soak.py) end 27% over its limit.
    """
    settings = make_settings(
        image_cache_max_size=10 * MiB, max_image_fraction=1, free_space_watermark=0
    )
    with ImageCache(settings) as first_cache, ImageCache(settings) as second_cache:
        first, second = Capacity(first_cache), Capacity(second_cache)
        held = first.reserve("one", 7 * MiB)
        assert held.admission is Admission.ADMITTED
        assert os.listdir(first_cache.driver.layout.reservation_dir) == [held.ticket]
        # No file of "one" exists yet, and nothing is committed that could be evicted.
        assert second.reserve("two", 7 * MiB).admission is Admission.NO_SPACE
        assert second.reserve("one", 7 * MiB).admission is Admission.ADMITTED  # the same room
        first.release(held)
        assert second.reserve("three", 4 * MiB).admission is Admission.NO_SPACE  # "one" again
        assert first.reserve("four", 4 * MiB).admission is Admission.NO_SPACE
        assert first.reserve("four", 3 * MiB).admission is Admission.ADMITTED  # 7 + 3 fit 10


def test_a_dead_processs_reservation_is_dropped(
    make_settings: Callable[..., Settings], cache_dir: Path
) -> None:
    settings = make_settings(
        image_cache_max_size=10 * MiB, max_image_fraction=1, free_space_watermark=0
    )
    # A real process that reserves and dies without releasing (os._exit skips
    # every cleanup, as a kill would); its ticket stays, unlocked.
    script = (
        "import os, sys\n"
        "from imagecache import ImageCache\n"
        "from imagecache.capacity import Capacity\n"
        "from imagecache.settings import load_settings\n"
        "cache = ImageCache(load_settings(None, image_cache_dir=sys.argv[1],"
        " image_cache_max_size=10 * 2**20, max_image_fraction=1, free_space_watermark=0))\n"
        "print(Capacity(cache).reserve('one', 7 * 2**20).ticket, flush=True)\n"
        "os._exit(0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(cache_dir)], capture_output=True, text=True, check=True
    )
    ticket = done.stdout.strip()
    with ImageCache(settings) as cache:
        ledger = cache.driver.layout.reservation_dir
        assert os.listdir(ledger) == [ticket]
        got = Capacity(cache).reserve("two", 7 * MiB)
        assert got.admission is Admission.ADMITTED
        assert os.listdir(ledger) == [got.ticket]


# --- through the service --------------------------------------------------------------------


# Scale 10 is the case: a 100 MiB limit, ~400 MiB of concurrent fills,
# an 80 MiB image that must stream through. Scale 1 is the same, ten times smaller.
@pytest.mark.parametrize("scale", [1, 10], ids=["10MiB-limit", "100MiB-limit"])
async def test_the_service_keeps_the_limit_and_streams_what_is_too_large(
    aiohttp_client: Any,
    make_settings: Callable[..., Settings],
    cache_dir: Path,
    tmp_path: Path,
    scale: int,
) -> None:
    limit = 10 * MiB * scale
    origin = tmp_path / "origin"
    images = {f"img-{i}": _data(i, scale) for i in range(16)}
    for image_id, data in images.items():
        put_image(origin, image_id, data)
    huge = _data(3, scale) * 2  # 8 MiB (times scale): above half the limit
    put_image(origin, "huge", huge)
    settings = make_settings(image_cache_max_size=limit, free_space_watermark=0)
    client = await aiohttp_client(directory_app(settings, origin))
    cache = client.app[STATE].cache
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with cache.exclusive("capacity"):  # see the library test above for why
                samples.append(_bytes_on_disk(cache_dir))

    async def download(image_id: str) -> bytes:
        async with client.get(f"/v2/images/{image_id}/file") as response:
            assert response.status == 200
            return await response.read()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        bodies = await asyncio.gather(*(download(image_id) for image_id in images))
        await settled(client)
        # Those the burst could not make room for (no_space) come again one by
        # one: now room is made by evicting what the burst cached.
        for image_id in images:
            if not await asyncio.to_thread(cache.is_cached, image_id):
                assert await download(image_id) == images[image_id]
        huge_body = await download("huge")
        # A client has its last byte a moment before the fill commits and
        # gives back its reservation.
        await settled(client)
    finally:
        stop.set()
        await asyncio.to_thread(sampler.join)
    assert bodies == list(images.values())
    assert huge_body == huge
    assert not (cache_dir / "huge").exists()
    assert len(samples) > 10
    assert max(samples) <= limit, (max(samples), limit)
    assert 0 < cache.get_cache_size() <= limit
    async with client.get("/metrics") as response:
        metrics = await response.text()
    assert 'imagecache_bypasses_total{reason="too_large"} 1.0' in metrics
    assert f"imagecache_max_size_bytes {float(limit):.6e}" in metrics
    assert "imagecache_reserved_bytes 0.0" in metrics
    evicted = re.search(r'imagecache_evictions_total\{reason="reservation"\} (\d+)', metrics)
    assert evicted is not None
    assert int(evicted.group(1)) > 0


def _fd_targets() -> list[str]:
    """What this process's descriptors point at, but sqlite's.

    Each disk thread opens its own database connection on first use, so those
    grow with the pool whatever the test does.
    """
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            target = os.readlink(f"/proc/self/fd/{fd}")
            if not os.path.basename(target).startswith("cache.db"):
                targets.append(target)
    return sorted(targets)


async def test_a_fill_cancelled_while_reserving_gives_back_what_its_thread_took(
    aiohttp_client: Any, make_settings: Callable[..., Settings], cache_dir: Path, tmp_path: Path
) -> None:
    """The reserving thread cannot be stopped; what it takes after the cancel is given back."""
    origin = tmp_path / "origin"
    put_image(origin, "img", _data(1))
    client = await aiohttp_client(directory_app(make_settings(free_space_watermark=0), origin))
    state = client.app[STATE]
    info = await state.upstream.info("img", ANONYMOUS)
    before = len(_fd_targets())
    reserved = cache_dir / ".locks" / "reserved"
    # Held here, the capacity lock keeps the fill's thread inside reserve() (flock
    # locks belong to open files, so the thread's own open of the lock file waits).
    with state.cache.exclusive("capacity"):
        joining = asyncio.create_task(state.fills.join("img", info, ANONYMOUS))
        flight = None

        async def started() -> bool:
            nonlocal flight
            flight = state.fills.current("img")
            return flight is not None and flight.task is not None

        await poll(started, "the fill has started deciding", within=5)
        assert flight is not None
        assert flight.task is not None
        flight.task.cancel()
        await asyncio.wait([flight.task, joining], timeout=10)
    # The thread now reserves, takes the fill lock and opens the file; then all goes back.

    async def given_back() -> bool:
        return (
            not os.listdir(reserved)
            and not os.listdir(cache_dir / "incomplete")
            and len(_fd_targets()) <= before
        )

    with contextlib.suppress(AssertionError):
        await poll(given_back, "the reservation, the fill's file and descriptors are given back")
    assert os.listdir(reserved) == []
    assert os.listdir(cache_dir / "incomplete") == []
    assert len(_fd_targets()) <= before, _fd_targets()
    assert state.fills.capacity is not None
    assert state.fills.capacity.ledger.count() == 0
