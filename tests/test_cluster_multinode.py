"""Three real service processes, one PostgreSQL, one origin: the cluster as operators run it.

Each node is ``imagecache serve`` in its own process with its own cache
directory, on a free loopback port that is also its ``worker_self_reference_url``;
all share a fresh PostgreSQL database (``cluster_helpers``, ``central_db``). The origin is the
``http_origin`` peer, which counts body reads and can hold a body at a gate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from cluster_helpers import (
    DATA,
    DEADLINE,
    HALF,
    SIZE,
    TOKEN,
    StartNode,
    download,
    holders,
    settle,
)
from imagecache.cli import main
from peers import free_port
from server_helpers import ServeProcess, poll

# A node is one serve process over its own cache directory.
Node = ServeProcess


async def test_siblings_fill_from_each_other_and_deletion_reaches_every_node(
    cluster_node: StartNode, http_origin: Any
) -> None:
    http_origin.add("img", DATA)
    one, two, three = [await cluster_node(name) for name in ("one", "two", "three")]
    everyone = (one, two, three)
    async with aiohttp.ClientSession() as session:
        for node in everyone:
            assert await holders(session, node, "img") == []

        # Node 1 misses: the origin is read once, and every node knows where it is.
        assert await download(session, one, "img") == DATA
        assert http_origin.body_reads("img") == 1
        for node in everyone:
            assert await holders(session, node, "img") == [one.url]

        # Nodes 2 and 3 at the same moment: both fill from node 1, not the origin.
        two_body, three_body = await asyncio.gather(
            download(session, two, "img"), download(session, three, "img")
        )
        assert two_body == DATA
        assert three_body == DATA
        assert http_origin.body_reads("img") == 1
        assert (two.cache_dir / "img").read_bytes() == DATA
        assert (three.cache_dir / "img").read_bytes() == DATA
        # From node 1, or from the other one if it had committed first (holders are
        # picked at random): either way a sibling, never the origin.
        for node, others in ((two, (one, three)), (three, (one, two))):
            sources = "|".join(re.escape(other.url) for other in others)
            assert re.search(f"filled img from sibling ({sources})$", node.log(), re.M)
        for node in everyone:
            assert await holders(session, node, "img") == sorted(n.url for n in everyone)

        # Deleting through node 3 removes the image from every node, within a bound.
        async with session.delete(f"{three.url}/v2/cache/img") as response:
            assert response.status == 204
        assert await holders(session, one, "img") == []  # condemned copies are not offered

        async def gone_everywhere() -> bool:
            return not any((node.cache_dir / "img").exists() for node in everyone)

        await poll(gone_everywhere, "every node dropped its copy", within=DEADLINE)
        for node in everyone:
            assert await holders(session, node, "img") == []

        # A sibling without the token is refused, with one it gets only what is cached.
        async with session.get(
            f"{two.url}/v2/images/img/file", headers={"X-Imagecache-Cluster-Token": "wrong"}
        ) as response:
            assert response.status == 403
        async with session.get(
            f"{two.url}/v2/images/img/file", headers={"X-Imagecache-Cluster-Token": TOKEN}
        ) as response:
            assert response.status == 404
        assert http_origin.body_reads("img") == 1


async def test_three_cold_nodes_at_once_read_the_origin_once(
    cluster_node: StartNode, http_origin: Any
) -> None:
    """No node has the image yet: one claims the origin read, the others follow its fill."""
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=HALF)
    everyone = [await cluster_node(name) for name in ("one", "two", "three")]
    async with aiohttp.ClientSession() as session:
        downloads = [asyncio.create_task(download(session, node, "img")) for node in everyone]
        await http_origin.wait_for_reads("img", 1, within=DEADLINE)
        gate.set()
        bodies = await asyncio.gather(*downloads)
        assert all(body == DATA for body in bodies)
        assert http_origin.body_reads("img") == 1
        for node in everyone:
            assert (node.cache_dir / "img").read_bytes() == DATA
            assert await holders(session, node, "img") == sorted(n.url for n in everyone)

        # A node stopped gracefully leaves the cluster at once, not after node_dead_after.
        one, two, three = everyone
        three.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(three.process.wait(), timeout=DEADLINE) == 0
        assert await holders(session, one, "img") == sorted([one.url, two.url])


async def test_a_sibling_killed_mid_transfer_falls_back_to_the_origin(
    cluster_node: StartNode, http_origin: Any
) -> None:
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=HALF)
    one, two = await cluster_node("one"), await cluster_node("two")
    async with aiohttp.ClientSession() as session:
        # Node 1 starts reading the origin and stops at the gate, half way.
        first = asyncio.create_task(download(session, one, "img"))
        await http_origin.wait_for_reads("img", 1, within=DEADLINE)

        # Node 2 misses meanwhile and follows node 1's fill in progress.
        async with session.get(f"{two.url}/v2/images/img/file") as response:
            assert response.status == 200
            body = bytearray()
            while len(body) < HALF // 2:
                chunk = await response.content.read(64 * 1024)
                assert chunk, "node 2 ended its body early"
                body += chunk
            assert http_origin.body_reads("img") == 1  # node 2 is reading node 1, not the origin

            one.process.send_signal(signal.SIGKILL)
            await one.process.wait()
            gate.set()
            body += await response.content.read()
        with contextlib.suppress(aiohttp.ClientError):
            await first  # node 1's own client saw its server die

        # Node 2 continued from the origin where node 1 stopped: right bytes, verified.
        assert bytes(body) == DATA
        await settle(session, two)
        assert f"sibling {one.url} failed to serve img" in two.log()
        assert http_origin.body_reads("img") == 2
        # The second read continued where node 1 stopped, it did not start over.
        assert http_origin.bytes_sent("img") < 2 * SIZE
        assert (two.cache_dir / "img").read_bytes() == DATA
        assert not (one.cache_dir / "img").exists()
        assert await holders(session, two, "img") == [two.url]
        counted = {
            source: await metric(session, two, "imagecache_cluster_fills_total", source=source)
            for source in ("origin", "sibling", "sibling_then_origin")
        }
        assert counted == {"origin": 0, "sibling": 0, "sibling_then_origin": 1}


async def metric(session: aiohttp.ClientSession, node: Node, name: str, **labels: str) -> float:
    """One sample of a node's ``/metrics`` (0 when absent)."""
    async with session.get(f"{node.url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_queueing_on_named_nodes_fills_those_nodes_only(
    cluster_node: StartNode, http_origin: Any
) -> None:
    """``queue-image --nodes``: two of three nodes asked, plus one URL where nothing listens."""
    http_origin.add("img", DATA)
    one, two, three = [await cluster_node(name) for name in ("one", "two", "three")]
    nowhere = f"http://127.0.0.1:{free_port()}"  # closed at once: nothing listens there
    argv = ["--json", "queue-image", "img", "--nodes", f"{one.url},{nowhere},{two.url}"]
    result = await asyncio.to_thread(CliRunner().invoke, main, [*argv, "--concurrency", "2"])
    assert result.exit_code == 1, result.output  # one node failed
    answer = json.loads(result.output)["nodes"]
    assert answer[one.url]["result"] == "queued"
    assert answer[two.url]["result"] == "queued"
    assert answer[nowhere]["result"] == "error"
    assert "cannot reach" in answer[nowhere]["error"]

    async with aiohttp.ClientSession() as session:

        async def both_cached() -> bool:
            return await holders(session, three, "img") == sorted([one.url, two.url])

        await poll(both_cached, "nodes one and two hold the image", within=DEADLINE)
        assert (one.cache_dir / "img").read_bytes() == DATA
        assert (two.cache_dir / "img").read_bytes() == DATA
        assert not (three.cache_dir / "img").exists()
        # Queued at the same moment: one node read the origin, the other followed it.
        assert http_origin.body_reads("img") == 1
        fills = {
            source: sum(
                [
                    await metric(session, n, "imagecache_cluster_fills_total", source=source)
                    for n in (one, two, three)
                ]
            )
            for source in ("origin", "sibling", "sibling_then_origin")
        }
        assert fills == {"origin": 1, "sibling": 1, "sibling_then_origin": 0}

        async def three_live() -> bool:
            values = [await metric(session, n, "imagecache_cluster_nodes_live") for n in everyone]
            return values == [3, 3, 3]

        everyone = (one, two, three)
        await poll(three_live, "every node counts three live nodes", within=DEADLINE)

    again = await asyncio.to_thread(
        CliRunner().invoke, main, ["queue-image", "img", "--nodes", f"{one.url},{three.url}"]
    )
    assert again.exit_code == 0, again.output
    assert f"{one.url}  already_cached" in again.output
    assert f"{three.url}  queued" in again.output


async def test_queueing_on_all_nodes_asks_every_live_node(
    cluster_node: StartNode,
    http_origin: Any,
    fresh_postgres_url: str,
    tmp_path: Path,
) -> None:
    """``queue-image --nodes all``: the live nodes from the database, or through a node's API."""
    http_origin.add("img", DATA)
    one, two, three = [await cluster_node(name) for name in ("one", "two", "three")]
    assert await three.stop() == 0  # stopped gracefully: no longer live
    # Node one's own settings, as an operator on its host has them.
    config = tmp_path / "one.toml"
    config.write_text(
        f'image_cache_dir = "{one.cache_dir}"\n'
        'image_cache_driver = "central"\n'
        f'database_url = "{fresh_postgres_url}"\n'
        f'worker_self_reference_url = "{one.url}"\n'
    )
    argv = ["--config", str(config), "--json", "queue-image", "img", "--nodes", "all"]
    result = await asyncio.to_thread(CliRunner().invoke, main, argv)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)["nodes"]
    assert {url: node["result"] for url, node in answer.items()} == {
        one.url: "queued",
        two.url: "queued",
    }

    async with aiohttp.ClientSession() as session:

        async def both_cached() -> bool:
            return await holders(session, one, "img") == sorted([one.url, two.url])

        await poll(both_cached, "nodes one and two hold the image", within=DEADLINE)
    assert not (three.cache_dir / "img").exists()

    remote = await asyncio.to_thread(
        CliRunner().invoke, main, ["--url", two.url, "queue-image", "img", "--nodes", "all"]
    )
    assert remote.exit_code == 0, remote.output
    assert f"{one.url}  already_cached" in remote.output
    assert f"{two.url}  already_cached" in remote.output
    assert three.url not in remote.output
