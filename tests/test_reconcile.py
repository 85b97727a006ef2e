"""Start-up reconciliation over a deliberately inconsistent cache directory."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from driver_kinds import settings_for
from imagecache import CachedImage, ImageCache
from imagecache.reconcile import reconcile
from polling import eventually
from server_helpers import image_bytes, listdir, start_serve


@pytest.mark.parametrize("kind", ["sqlite", "xattr"])
def test_a_crafted_inconsistent_directory(kind: str, cache_dir: Path, tmp_path: Path) -> None:
    settings = settings_for(kind, cache_dir, tmp_path)
    with ImageCache(settings) as cache:
        assert cache.cache_image_iter("kept", [b"k" * 1000])
        assert cache.cache_image_iter("gone", [b"g" * 1000])
        assert cache.cache_image_iter("resized", [b"r" * 1000])
        # Rows the files no longer agree with: a file removed behind our back,
        # one that grew (its recorded hash no longer vouches for it), an
        # orphan file, an empty orphan, and a dead fill.
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
            report = reconcile(cache.driver, started_at=time.time() - 1)
            assert live.exists()
        live.unlink()

        assert report.stale_fills == 1
        assert (cache_dir / "invalid" / "dead").exists()
        assert (cache_dir / "incomplete" / "fresh").exists()
        assert report.rejected == 1
        assert (cache_dir / "invalid" / "empty").exists()
        images = {image.image_id: image for image in cache.get_cached_images()}
        assert set(images) == {"kept", "orphan"}
        assert report.quarantined == 1
        assert (cache_dir / "invalid" / "resized").stat().st_size == 1500
        assert images["orphan"].hits == 0
        assert images["orphan"].size == 700
        assert images["orphan"].last_accessed == pytest.approx(past)
        assert cache.get_cache_size() == 1000 + 700

        # Consistent now: a second pass finds nothing.
        assert not reconcile(cache.driver, started_at=time.time() - 1).changed


# --- a real crash of the service ---------------------------------------------------------------


async def test_sigkill_mid_fill_then_restart(http_origin: Any, tmp_path: Path) -> None:
    """Kill -9 while three fills hang half-way; after a restart nothing partial is served."""
    cache_dir = tmp_path / "cache"
    upstream = "http:" + http_origin.template
    images = {f"img-{n}": image_bytes(1_000_000 + n, seed=n) for n in range(3)}
    for name, data in images.items():
        http_origin.add(name, data)
    http_origin.add("done", image_bytes(300_000, seed=9))
    half = 500_000
    gates = {name: http_origin.gate(name, after=half) for name in images}

    server = await start_serve(cache_dir, upstream)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/v2/images/done/file") as response:
                assert await response.read() == image_bytes(300_000, seed=9)

            async def download(name: str) -> bytes:
                async with session.get(f"{server.url}/v2/images/{name}/file") as response:
                    return await response.read()

            downloads = [asyncio.create_task(download(name)) for name in images]
            for name in images:  # every fill is half-way, holding its gate
                await eventually(
                    lambda n=name: _size(cache_dir / "incomplete" / n) >= half,
                    f"half of {name} is on disk",
                    within=20,
                )
            server.process.kill()  # SIGKILL: no shutdown code runs
            results = await asyncio.gather(*downloads, return_exceptions=True)
    finally:
        with contextlib.suppress(ProcessLookupError):
            await server.stop()
    # Every interrupted client saw an error, never a short body passed off as whole.
    assert all(isinstance(result, aiohttp.ClientError) for result in results), results
    assert sorted(listdir(cache_dir / "incomplete")) == sorted(images)
    assert not any((cache_dir / name).exists() for name in images)

    for gate in gates.values():
        gate.set()
    server = await start_serve(cache_dir, upstream)
    try:
        async with aiohttp.ClientSession() as session:
            stats_url = f"{server.url}/v2/cache/stats"  # loopback caller: admin

            async def reconciled() -> bool:
                async with session.get(stats_url) as response:
                    return bool((await response.json())["maintenance_runs"].get("reconcile"))

            await eventually(reconciled, "a reconciliation has run", within=20)
            # The dead fills went to invalid/; metadata and files agree.
            assert listdir(cache_dir / "incomplete") == []
            assert sorted(listdir(cache_dir / "invalid")) == sorted(images)
            async with session.get(f"{server.url}/v2/cache") as response:
                listed = {
                    e["image_id"]: e["size"] for e in (await response.json())["cached_images"]
                }
            assert listed == {"done": 300_000}
            assert (cache_dir / "done").stat().st_size == 300_000
            # And the interrupted images can be fetched again, whole.
            for name, data in images.items():
                async with session.get(f"{server.url}/v2/images/{name}/file") as response:
                    assert response.status == 200
                    assert await response.read() == data
            # The cache API answers once the verified fills have committed.
            async with session.get(f"{server.url}/v2/cache") as response:
                assert response.status == 200
            for name, data in images.items():
                assert (cache_dir / name).read_bytes() == data
    finally:
        await server.stop()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
