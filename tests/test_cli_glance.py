"""The CLI's remote mode against a real Glance API with its own cache on.

Glance's ``/v2/cache`` is the API ``glance-cache-manage``'s successors speak;
the verbs Glance has work against it unchanged, and ours beyond it fail with
one clear line.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from click.testing import CliRunner, Result

from imagecache.cli import main
from polling import eventually

pytestmark = pytest.mark.glance


async def cli(url: str, *args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, main, ["--url", url, *args])


async def test_glance_verbs_against_a_real_glance(glance_peer: Any) -> None:
    url = glance_peer.url
    [(image_id, _data)] = await asyncio.to_thread(glance_peer.seed, 1, 200_000)

    queued = await cli(url, "queue-image", image_id)
    assert queued.exit_code == 0, queued.output
    assert queued.output.strip() in (
        f"Queued image {image_id}.",
        f"Image {image_id} is already cached.",
    )
    # Glance's worker caches it at once; poll its listing with a deadline.

    async def listed() -> bool:
        entries = json.loads((await cli(url, "--json", "list-cached")).output)
        return any(entry["image_id"] == image_id for entry in entries)

    await eventually(listed, "Glance lists the image as cached", within=30, interval=0.2)
    table = (await cli(url, "list-cached")).output
    assert image_id in table
    assert "195.3 KiB" in table
    assert (await cli(url, "list-queued")).exit_code == 0

    pruned = await cli(url, "--json", "prune")
    assert json.loads(pruned.output) == {"total_files_pruned": 0, "total_bytes_pruned": 0}
    assert (await cli(url, "clean")).output.strip() == "Cleaned."
    assert (await cli(url, "delete-cached-image", "-f", image_id)).exit_code == 0
    # The peer lives for the session: other tests may have left images in its cache.
    listed = json.loads((await cli(url, "--json", "list-cached")).output)
    assert image_id not in {entry["image_id"] for entry in listed}

    # Ours beyond Glance's API: a clear one-line error, exit 1.
    stats = await cli(url, "stats")
    assert stats.exit_code == 1
    assert stats.output.startswith(f"Error: {url} does not offer GET /v2/cache/stats")
    assert "needs an imagecache service" in stats.output
    assert stats.output.count("\n") == 1
    pin = await cli(url, "pin", image_id)
    assert pin.exit_code == 1
    assert pin.output.startswith(f"Error: {url} does not offer GET /v2/cache/stats")
