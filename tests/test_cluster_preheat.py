"""``imagecache preheat`` against real nodes: three ``imagecache serve`` over one PostgreSQL.

As in ``test_cluster_multinode``: each node its own process, cache directory
and loopback port (its ``worker_self_reference_url``), the ``http_origin``
peer as the origin. One node is down when the job is made; it is reported
failed ("node not live") and the CLI says so by its exit code, in the table
and in ``--json``; started again, it runs its items and the job completes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from click.testing import CliRunner, Result
from sqlalchemy import select

from cluster_helpers import StartNode
from imagecache.cli import main
from imagecache.drivers.central import make_engine, preheat_items
from server_helpers import image_bytes

IMAGES = {
    "img-a": image_bytes(3 * 1024 * 1024 + 17, seed=21),
    "img-b": image_bytes(700_001, seed=22),
}


async def preheat(url: str, *args: str, follow_for: float = 60) -> Result:
    argv = ["--url", url, "preheat", *args, "--timeout", str(follow_for), "--interval", "0.1"]
    return await asyncio.to_thread(CliRunner().invoke, main, argv)


async def test_a_preheat_with_a_node_down_fails_it_and_completes_when_it_returns(
    cluster_node: StartNode, http_origin: Any
) -> None:
    for image_id, data in IMAGES.items():
        http_origin.add(image_id, data)
    one, two, three = [await cluster_node(name) for name in ("one", "two", "three")]
    assert await three.stop() == 0  # gracefully: not live from now on
    nodes = f"{one.url},{two.url},{three.url}"

    result = await preheat(two.url, "--json", "img-a", "img-b", "--nodes", nodes)
    assert result.exit_code == 3, result.output  # the job ended, not every node has every image
    job = json.loads(result.stdout)
    assert job["state"] == "done"
    assert job["finished"] is True
    assert job["ok"] is False
    for done in (one, two):
        entry = job["nodes"][done.url]
        assert (entry["ok"], entry["finished"], entry["total"]) == (True, 2, 2)
        assert {i: e["state"] for i, e in entry["images"].items()} == {
            "img-a": "cached",
            "img-b": "cached",
        }
        assert entry["images"]["img-a"]["bytes"] == len(IMAGES["img-a"])
        for image_id, data in IMAGES.items():
            assert (done.cache_dir / image_id).read_bytes() == data
    down = job["nodes"][three.url]
    assert down["alive"] is False
    assert down["ok"] is False
    for entry in down["images"].values():
        assert entry["state"] == "failed"
        assert entry["reason"].startswith("node not live")
    assert job["counts"] == {
        "cached": 4, "failed": 2, "pending": 0, "running": 0, "skipped": 0, "cancelled": 0
    }  # fmt: skip
    # Once per image from the origin: the second node filled from the first, or followed it.
    assert http_origin.body_reads("img-a") == 1
    assert http_origin.body_reads("img-b") == 1

    # The same job for people, asked of another node: the table says the same.
    table = await preheat(one.url, "--job", str(job["id"]))
    assert table.exit_code == 3, table.output
    assert f"{three.url}  img-a  failed" in table.stdout
    assert "node not live" in table.stdout
    assert f"{one.url}  img-b  cached" in table.stdout
    assert "some nodes lack some images" in table.stdout
    assert f"{one.url}  [####################]  2/2  cached" in table.stderr
    assert f"{three.url}  [xxxxxxxxxxxxxxxxxxxx]  2/2  node not live" in table.stderr
    assert not (three.cache_dir / "img-a").exists()

    # Started again, the node runs the items it missed: the first job completes by itself...
    three = await cluster_node("three")
    later = await preheat(one.url, "--json", "--job", str(job["id"]))
    assert later.exit_code == 0, later.output
    assert json.loads(later.stdout)["nodes"][three.url]["ok"] is True
    for image_id, data in IMAGES.items():
        assert (three.cache_dir / image_id).read_bytes() == data
    # ...and run again, the job finds every node with every image.
    again = await preheat(three.url, "--json", "img-a", "img-b", "--nodes", nodes)
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert rerun["ok"] is True
    assert rerun["counts"]["skipped"] == 6
    assert {e["reason"] for n in rerun["nodes"].values() for e in n["images"].values()} == {
        "already cached"
    }
    assert http_origin.body_reads("img-a") + http_origin.body_reads("img-b") <= 4


async def test_all_and_sites_and_cli_usage(cluster_node: StartNode, http_origin: Any) -> None:
    """``--nodes all`` is every live node; bad input is one line and exit 1 or 2."""
    http_origin.add("img-a", IMAGES["img-a"])
    one, two = await cluster_node("one"), await cluster_node("two")
    result = await preheat(one.url, "img-a", "--nodes", "all")
    assert result.exit_code == 0, result.output
    assert f"{one.url}  img-a  cached" in result.stdout or f"{one.url}  img-a  skipped" in (
        result.stdout
    )
    assert two.url in result.stdout
    assert "every node has every image" in result.stdout

    unknown = await preheat(one.url, "img-a", "--nodes", "moon")
    assert unknown.exit_code == 1
    assert "unknown site 'moon'" in unknown.output
    missing = await preheat(one.url, "--nodes", "all")
    assert missing.exit_code == 2
    assert "needs images and --nodes" in missing.output
    local = await asyncio.to_thread(
        CliRunner().invoke, main, ["--cache-dir", str(one.cache_dir), "preheat", "img-a"]
    )
    assert local.exit_code == 2
    assert "give --url" in local.output


async def test_a_node_stopped_mid_item_hands_it_back_and_runs_it_when_it_returns(
    cluster_node: StartNode, http_origin: Any, fresh_postgres_url: str
) -> None:
    data = IMAGES["img-a"]
    http_origin.add("img-a", data)
    gate = http_origin.gate("img-a", after=len(data) // 2)  # the read stops half way
    # A short upstream_timeout: the stopping node's grace for its fill (shutdown_grace).
    one = await cluster_node("one", IMAGECACHE_UPSTREAM_TIMEOUT="5")
    started = await preheat(one.url, "--json", "img-a", "--nodes", one.url, follow_for=0)
    assert started.exit_code == 4, started.output  # not done at once: the read is held
    job_id = str(json.loads(started.stdout)["id"])
    await http_origin.wait_for_reads("img-a", 1, within=20)
    assert await one.stop() == 0

    engine = make_engine(fresh_postgres_url)
    try:
        with engine.connect() as conn:
            states = conn.execute(select(preheat_items.c.state)).scalars().all()
    finally:
        engine.dispose()
    assert states == ["pending"]  # handed back, not left "running" until a lease lapses

    gate.set()
    one = await cluster_node("one")
    done = await preheat(one.url, "--job", job_id)
    assert done.exit_code == 0, done.output
    assert (one.cache_dir / "img-a").read_bytes() == data
