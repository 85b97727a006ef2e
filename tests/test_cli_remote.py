"""Every verb of ``imagecache`` in remote mode, against ``imagecache serve`` as a real process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imagecache.cli import main
from polling import eventually
from server_helpers import ServeProcess, image_bytes, put_image, start_serve

TOKEN = "remote-admin-token"
GOOD = {f"img-{n}": image_bytes(200_000 + n, seed=n) for n in range(3)}


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[ServeProcess, Path, Path]]:
    origin, cache_dir = tmp_path / "origin", tmp_path / "cache"
    for image_id, data in GOOD.items():
        put_image(origin, image_id, data)
    # A corrupt origin copy: its sidecar promises other bytes.
    put_image(origin, "corrupt", b"the real bytes" * 1000)
    (origin / "corrupt.sha256").write_text("0" * 64 + "\n")
    server = await start_serve(
        cache_dir,
        f"directory:{origin}",
        env={"IMAGECACHE_ADMIN_TOKEN": TOKEN, "IMAGECACHE_QUEUE_INTERVAL": "0"},
    )
    try:
        yield server, cache_dir, origin
    finally:
        await server.stop()


async def cli(url: str, *args: str, token: str = TOKEN, stdin: str | None = None) -> Result:
    """The CLI in a thread, so the test's loop keeps draining the server's stderr."""
    argv = ["--url", url, "--token", token, *args]
    return await asyncio.to_thread(CliRunner().invoke, main, argv, input=stdin)


async def as_json(url: str, *args: str) -> Any:
    result = await cli(url, "--json", *args)
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)


def _flip_bytes(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(1000)
        handle.write(b"\xff\xfe")


async def test_every_verb_against_a_running_service(
    service: tuple[ServeProcess, Path, Path],
) -> None:
    server, cache_dir, _origin = service
    url = server.url
    assert (await cli(url, "list-cached")).output.strip() == "No cached images."
    assert await as_json(url, "list-queued") == []

    # queue-image fetches at once (PUT /v2/cache/{id}); prefetch waits for the queue.
    for image_id in (*GOOD, "corrupt"):
        result = await cli(url, "queue-image", image_id)
        assert result.exit_code == 0, result.output
    prefetch = await cli(url, "prefetch")
    assert prefetch.exit_code in (0, 1), prefetch.output

    async def settled() -> bool:
        # The PUTs may still be filling: prefetch again until every verdict is in.
        if {e["image_id"] for e in await as_json(url, "list-cached")} == set(GOOD):
            queued = await as_json(url, "list-queued")
            if queued and queued[0]["error"]:
                return True
        await cli(url, "prefetch")
        return False

    await eventually(settled, "the good images are cached and the corrupt one failed", within=60)
    assert {e["image_id"] for e in await as_json(url, "list-cached")} == set(GOOD)
    [left] = await as_json(url, "list-queued")
    assert left["image_id"] == "corrupt"
    assert "verification" in left["error"]
    human = (await cli(url, "list-queued")).output
    assert "corrupt" in human
    assert "verification" in human
    assert (cache_dir / "invalid" / "corrupt").exists()

    listed = (await cli(url, "list-cached")).output
    assert "195.3 KiB" in listed
    assert "never" in listed

    stats = await as_json(url, "stats")
    assert stats["cached_images"] == 3
    assert stats["queued_with_errors"] == 1
    assert stats["maintenance_runs"].get("reconcile") == 1
    human = (await cli(url, "stats")).output
    runs = next(line for line in human.splitlines() if line.startswith("maintenance runs"))
    assert "reconcile 1" in runs
    assert "{" not in human

    assert (await cli(url, "pin", "img-0")).output.strip() == "Pinned image img-0."
    pinned = {e["image_id"]: e["pinned"] for e in await as_json(url, "list-cached")}
    assert pinned == {"img-0": True, "img-1": False, "img-2": False}
    assert (await cli(url, "unpin", "img-0")).exit_code == 0
    nothing = await cli(url, "unpin", "img-0")
    assert (nothing.exit_code, nothing.output.strip()) == (0, "Image img-0 was not pinned.")

    assert (await as_json(url, "verify"))["ok"] is True
    await asyncio.to_thread(_flip_bytes, cache_dir / "img-2")
    report = await as_json(url, "verify")
    assert report["corrupt"] == ["img-2"]
    assert (await cli(url, "verify", "img-1")).exit_code == 0

    assert (await cli(url, "delete-cached-image", "img-1", stdin="n\n")).exit_code == 1
    assert (await cli(url, "delete-cached-image", "-f", "img-1")).exit_code == 0
    assert (await as_json(url, "delete-queued-image", "-f", "corrupt")) == {"deleted": "corrupt"}
    assert (await cli(url, "queue-image", "img-1")).exit_code == 0
    assert (await as_json(url, "delete-all-queued-images", "-f"))["num_deleted"] in (0, 1)
    assert await as_json(url, "prune") == {"total_files_pruned": 0, "total_bytes_pruned": 0}
    assert (await cli(url, "clean")).exit_code == 0
    deleted = await as_json(url, "delete-all-cached-images", "-f")
    assert deleted["num_deleted"] >= 1
    assert await as_json(url, "list-cached") == []


async def test_remote_errors_are_one_line(service: tuple[ServeProcess, Path, Path]) -> None:
    server, _cache_dir, origin = service
    url = server.url
    cases = {
        ("delete-cached-image", "-f", "unknown"): "Error: image 'unknown' is not cached",
        ("pin", "unknown"): "Error: image 'unknown' is not cached",
        ("verify", "unknown"): "Error: image 'unknown' is not cached",
        ("delete-queued-image", "-f", "unknown"): "Error: image 'unknown' is not queued",
        ("queue-image", "unknown"): "Error: image 'unknown' not found upstream",
        ("queue-image", "..bad"): "Error: PUT /v2/cache/..bad failed (HTTP 400): invalid image id",
        ("import-glance-cache", str(origin)): "Error: import-glance-cache adopts files",
        ("queue-image", "img-0", "--nodes", "all"): (
            "Error: GET /v2/cache?all_nodes=true failed (HTTP 409): "
            "centralized caching is not enabled"
        ),
    }
    for args, expected in cases.items():
        result = await cli(url, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith(expected), (args, result.output)
        assert result.output.count("\n") == 1, (args, result.output)

    wrong = await cli(url, "list-cached", token="not-the-token")
    assert wrong.exit_code == 1
    assert wrong.output.startswith("Error: the service refused the request (HTTP 403)")
    assert "not-the-token" not in wrong.output

    await server.stop()
    gone = await cli(url, "stats")
    assert gone.exit_code == 1
    assert gone.output.startswith(f"Error: cannot reach the imagecache service at {url}")
