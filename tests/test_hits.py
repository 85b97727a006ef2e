"""A hit's file is closed whatever happens to the request that opened it (hits.py).

A request may be cancelled (its client gone, the server shutting down) while
a disk thread opens or closes its file; the file must still be closed, not
left to the garbage collector. The executor's single thread is held busy so
that the cancel lands exactly where it would hurt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from imagecache import ImageCache, ImageInfo
from imagecache.hits import Hit, close_hit, open_hit_off_loop
from imagecache.layout import CacheLayout
from imagecache.settings import Settings
from polling import eventually

Run = Callable[..., "asyncio.Future[Any]"]


@pytest.fixture
def run() -> Iterator[Run]:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def submit(func: Callable[..., Any], *args: object) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(executor, func, *args)

    yield submit
    executor.shutdown(wait=True)


async def test_a_cancelled_close_still_closes_the_file(run: Run, tmp_path: Path) -> None:
    (tmp_path / "img").write_bytes(b"x")
    busy = threading.Event()
    blocker = run(busy.wait, 10)  # the one thread is busy: the close waits in the queue
    hit = Hit((tmp_path / "img").open("rb"), 1, None)
    closing = asyncio.create_task(close_hit(hit, run))
    await asyncio.sleep(0)  # the close is queued
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    busy.set()
    await blocker
    await eventually(lambda: hit.handle.closed, "the cancelled close has closed the file")


async def test_a_hit_opened_for_a_cancelled_request_is_closed(
    run: Run, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = ImageCache(make_settings())
    try:
        cache.cache_image_iter("img", [b"data"], ImageInfo("img", size=4))
        opened: list[BinaryIO] = []
        open_committed = CacheLayout.open_committed
        inside, release = threading.Event(), threading.Event()

        def held_open(layout: CacheLayout, image_id: str) -> BinaryIO | None:
            handle = open_committed(layout, image_id)
            assert handle is not None
            opened.append(handle)
            inside.set()
            assert release.wait(10)  # the file is open; the request is cancelled now
            return handle

        monkeypatch.setattr(CacheLayout, "open_committed", held_open)  # frozen: the class
        opening = asyncio.create_task(open_hit_off_loop(run, cache, "img"))
        await eventually(inside.is_set, "the thread has opened the file")
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        release.set()
        await eventually(lambda: opened[0].closed, "the unclaimed hit's file is closed")
    finally:
        cache.close()
