"""A range at another worker process joins a segmented fill (fill/wanted.py).

Two real ``imagecache serve`` processes over one cache directory (the way
``--workers 2`` share it), in front of the ``http_origin`` peer, whose gate
holds the fill's first connections so that a range far ahead arrives while
the fill is stalled: before, the sibling judged the stalled fill's rate and
read the range from the origin a second time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from imagecache.fill.wanted import Wants, ask
from imagecache.settings import MiB
from polling import eventually
from range_helpers import COLLAPSED
from server_helpers import ServeProcess, image_bytes, start_serve
from test_fill_segments import _gets

# Eight segments of 1 MiB (the last 5 bytes short), over four connections.
SIZE = 8 * MiB - 5
DATA = image_bytes(SIZE, seed=61)
ENV = {
    "IMAGECACHE_FILL_SEGMENTS": "4",
    "IMAGECACHE_FILL_SEGMENT_SIZE": str(MiB),
    # Short: a sibling judging the stalled fill gives up on it at once.
    "IMAGECACHE_RANGE_WAIT_LIMIT": "0.2",
}


async def test_a_range_far_ahead_at_another_worker_is_served_by_the_fill_not_the_origin(
    http_origin: Any, tmp_path: Path, servers: list[ServeProcess]
) -> None:
    cache_dir = tmp_path / "cache"
    http_origin.add("img", DATA)
    # Segments 0 to 6 held after 256 KiB; the last one (from 7 MiB) is not.
    gate = http_origin.gate("img", after=256 * 1024, below=7 * MiB)
    upstream = "http:" + http_origin.template
    servers.append(await start_serve(cache_dir, upstream, env=ENV))
    servers.append(await start_serve(cache_dir, upstream, env=ENV))
    wanted = cache_dir / ".locks" / "wanted" / "img"
    start, end = 7 * MiB + 1000, 7 * MiB + 2000

    async def read(session: aiohttp.ClientSession, url: str, **headers: str) -> Any:
        async with session.get(url + "/v2/images/img/file", headers=headers) as response:
            return response.status, response.headers["Cache-Status"], await response.read()

    async with aiohttp.ClientSession() as session:
        whole = asyncio.create_task(read(session, servers[0].url))
        await http_origin.wait_for_reads("img", 4, within=20)  # segments 0-3, held
        part = asyncio.create_task(read(session, servers[1].url, Range=f"bytes={start}-{end - 1}"))

        def settled() -> bool:
            # Heard by the fill's owner, or (the old way) gone to the origin.
            heard = "a range in another process asks for byte" in servers[0].log()
            return heard or http_origin.body_reads("img") > 4

        await eventually(settled, "the range asks the fill, or reads the origin")
        gate.set()
        got = await asyncio.wait_for(asyncio.gather(whole, part), 60)
    assert [(status, cache) for status, cache, _ in got] == [
        (200, "imagecache; fwd=miss; stored"),
        (206, COLLAPSED),
    ]
    assert got[0][2] == DATA
    assert got[1][2] == DATA[start:end]
    gets = _gets(http_origin)
    # One image from the origin: each segment once, the range's never again.
    assert http_origin.bytes_sent("img") == SIZE, gets
    assert len(gets) == 8, gets
    # The range's segment was the next one taken, not the eighth.
    assert gets.index(f"bytes={7 * MiB}-{SIZE - 1}") == 4, gets
    await eventually(lambda: (cache_dir / "img").exists(), "the fill is committed")
    assert (cache_dir / "img").read_bytes() == DATA
    assert not wanted.exists(), "the owner removes its wanted file"


def test_a_wanted_file_is_believed_only_for_the_fill_it_names(tmp_path: Path) -> None:
    """What a crashed owner left names another inode: a sibling does not wait on it."""
    path = tmp_path / "wanted" / "img"
    assert not ask(path, 1234, 0), "no file: nobody listens"
    wants = Wants(path, inode=1234)
    assert not wants.grown()
    assert not ask(path, 999, 5 * MiB), "a file of another fill"
    assert ask(path, 1234, 5 * MiB)
    assert ask(path, 1234, 7 * MiB)
    assert wants.grown()
    assert wants.take() == [5 * MiB, 7 * MiB]
    assert wants.take() == []
    wants.close()
    assert not path.exists()
