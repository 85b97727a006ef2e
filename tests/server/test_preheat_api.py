"""``POST /v2/cache/preheat`` and ``GET /v2/cache/preheat/{id}``: the routes in one process.

The service in this process over a directory origin, its cache central on a
fresh PostgreSQL database, and a second node beside it (``preheat_helpers``).
Listing and cancelling jobs: ``test_preheat_jobs_api``. The whole cluster,
with real processes, is in ``test_cluster_preheat``.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner
from sqlalchemy import select, update

from central_db import central_settings
from imagecache import create_driver
from imagecache.cli import main
from imagecache.drivers.central import CentralDriver, preheat_items, preheat_jobs
from imagecache.preheating import NodeBars
from imagecache.settings import Settings
from preheat_helpers import ADMIN, DATA, SELF, TOKEN, ClientFactory, job, post
from server_helpers import directory_app, poll


@pytest.fixture
def origin_root(preheat_origin: Path) -> Path:
    return preheat_origin


@pytest.fixture
def client(preheat_client: TestClient[Any, Any]) -> TestClient[Any, Any]:
    return preheat_client


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"images": [], "nodes": ["all"]}, "images is empty"),
        ({"images": ["a"], "nodes": ["http://127.0.0.1:9/nobody"]}, "unknown node"),
        ({"images": ["a"], "nodes": ["moon"]}, "unknown site 'moon'"),
        ({"images": ["../etc"], "nodes": ["all"]}, "invalid image id"),
        ({"images": ["a"]}, "nodes is missing"),
        ({"images": ["a"], "nodes": []}, "no nodes"),
        ({"images": ["a"], "nodes": ["all", "near"]}, "give it alone"),
        ({"images": "a", "nodes": ["all"]}, "images must be a list"),
        ({"images": ["a"], "nodes": [7]}, "nodes must be"),
        (["a"], "JSON object"),
    ],
)
async def test_bad_requests_are_400_naming_the_problem(
    client: TestClient[Any, Any], body: Any, named: str
) -> None:
    status, text = await post(client, body)
    assert status == 400
    assert named in text


async def test_bad_json_and_bad_job_ids(client: TestClient[Any, Any]) -> None:
    async with client.post("/v2/cache/preheat", data=b"{nope", headers=ADMIN) as response:
        assert response.status == 400
        assert "must be JSON" in await response.text()
    for raw, status in (("x1", 400), ("\u0661", 400), ("999", 404)):
        async with client.get(f"/v2/cache/preheat/{raw}", headers=ADMIN) as response:
            assert response.status == status, raw


async def test_non_admin_is_403_before_anything_else(client: TestClient[Any, Any]) -> None:
    for headers in ({}, {"X-Auth-Token": "wrong"}, {"X-Auth-Token": ""}):
        status, _ = await post(client, {"images": [], "nodes": []}, headers)
        assert status == 403
        async with client.get("/v2/cache/preheat/1", headers=headers) as response:
            assert response.status == 403
    async with client.put("/v2/cache/preheat", headers=ADMIN) as response:
        assert response.status == 405  # GET and POST only: not taken for an image id "preheat"


async def test_without_the_central_driver_it_is_409(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], origin_root: Path
) -> None:
    app = directory_app(make_settings(admin_token=TOKEN), origin_root)
    client = await aiohttp_client(app)
    status, text = await post(client, {"images": ["a"], "nodes": ["all"]})
    assert status == 409
    assert "centralized caching is not enabled" in text
    assert "image_cache_driver = 'central'" in text
    async with client.get("/v2/cache/preheat/1", headers=ADMIN) as response:
        assert response.status == 409
    status, _ = await post(client, {"images": ["a"], "nodes": ["all"]}, {})
    assert status == 403


async def test_a_job_runs_here_and_waits_for_the_other_node(
    client: TestClient[Any, Any], other_node: CentralDriver, tmp_path: Path
) -> None:
    """This node caches both images; the other node's items wait for it, then it runs them."""
    status, answer = await post(client, {"images": ["a", "b", "a"], "nodes": ["near", "far"]})
    assert status == 202, answer
    job_id = answer["id"]
    assert answer["href"] == f"/v2/cache/preheat/{job_id}"

    async def mine_done() -> bool:
        return bool((await job(client, job_id))["nodes"][SELF]["ok"])

    await poll(mine_done, "this node cached both images")
    body = await job(client, job_id)
    assert body["images"] == ["a", "b"]  # each image once
    assert body["state"] == "running"
    assert not body["ok"]
    mine = body["nodes"][SELF]
    assert (mine["site"], mine["finished"], mine["total"]) == ("near", 2, 2)
    assert {i: e["state"] for i, e in mine["images"].items()} == {"a": "cached", "b": "cached"}
    assert mine["images"]["a"]["bytes"] == len(DATA)
    assert (tmp_path / "self" / "a").read_bytes() == DATA
    theirs = body["nodes"][other_node.self_url]
    assert {e["state"] for e in theirs["images"].values()} == {"pending"}

    # The other node (here: its driver, as its service would) claims and finishes them.
    assert other_node.claim_preheat_items(10) == [(job_id, "a"), (job_id, "b")]
    assert other_node.claim_preheat_items(10) == []  # claimed once
    other_node.finish_preheat_item(job_id, "a", "skipped", "already cached", 1)
    other_node.finish_preheat_item(job_id, "b", "failed", "origin said no")
    other_node.finish_preheat_item(job_id, "a", "pending")  # a late hand-back: ignored
    body = await job(client, job_id)
    assert body["state"] == "done"
    assert not body["ok"]
    assert body["counts"] == {
        "pending": 0,
        "running": 0,
        "cached": 2,
        "failed": 1,
        "skipped": 1,
        "cancelled": 0,
    }
    assert body["nodes"][other_node.self_url]["images"]["b"]["reason"] == "origin said no"

    # A job of images this node has: skipped, already cached.
    status, answer = await post(client, {"images": ["a"], "nodes": [SELF]})
    assert status == 202

    async def skipped() -> bool:
        entry = (await job(client, answer["id"]))["nodes"][SELF]["images"]["a"]
        return bool(entry["state"] == "skipped")

    await poll(skipped, "the second job skips the cached image")
    assert (await job(client, answer["id"]))["ok"] is True


async def test_a_dead_nodes_items_read_as_failed_until_it_returns(
    client: TestClient[Any, Any], other_node: CentralDriver
) -> None:
    status, answer = await post(client, {"images": ["a"], "nodes": [other_node.self_url]})
    assert status == 202
    other_node.leave()  # stopped: heartbeat 0
    body = await job(client, answer["id"])
    entry = body["nodes"][other_node.self_url]["images"]["a"]
    assert (entry["state"], entry["reason"]) == ("failed", "node not live (stopped)")
    assert body["state"] == "done"
    assert not body["ok"]
    # Not written: the node back, the item is pending again, and it runs it.
    other_node._left = False
    assert other_node.heartbeat()
    body = await job(client, answer["id"])
    assert body["nodes"][other_node.self_url]["images"]["a"]["state"] == "pending"
    assert other_node.claim_preheat_items(5) == [(answer["id"], "a")]
    other_node.finish_preheat_item(answer["id"], "a", "cached", size=len(DATA))
    body = await job(client, answer["id"])
    assert body["state"] == "done"
    assert body["ok"]


async def test_the_cli_times_out_with_4_while_a_live_node_has_not_run_its_items(
    client: TestClient[Any, Any], other_node: CentralDriver
) -> None:
    """The other node is live but runs nothing here: the job stays running past --timeout."""
    url = str(client.make_url("")).rstrip("/")
    argv = ["--url", url, "--token", TOKEN, "--json", "preheat", "a", "--nodes", "far"]
    argv += ["--timeout", "0.3", "--interval", "0.1"]
    result = await asyncio.to_thread(CliRunner().invoke, main, argv)
    assert result.exit_code == 4, result.output
    job = json.loads(result.stdout)
    assert job["finished"] is False
    assert job["state"] == "running"
    assert list(job["nodes"]) == [other_node.self_url]
    # Followed again once the node has done its part: exit 0, from the same job.
    assert other_node.claim_preheat_items(5) == [(job["id"], "a")]
    other_node.finish_preheat_item(job["id"], "a", "cached", size=len(DATA))
    argv = ["--url", url, "--token", TOKEN, "preheat", "--job", str(job["id"])]
    again = await asyncio.to_thread(CliRunner().invoke, main, argv)
    assert again.exit_code == 0, again.output
    assert "every node has every image" in again.stdout
    refused = await asyncio.to_thread(CliRunner().invoke, main, argv[:2] + argv[4:])
    assert refused.exit_code == 1
    assert "not authorized" in refused.output
    unknown = await asyncio.to_thread(CliRunner().invoke, main, [*argv[:-1], "999"])
    assert unknown.exit_code == 1
    assert unknown.output == f"Error: no preheat job 999 at {url}\n"


def test_node_bars_redraw_in_place_on_a_terminal_and_add_lines_elsewhere() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def job(finished: int) -> dict[str, Any]:
        node = {"total": 2, "finished": finished, "alive": True, "images": {}}
        return {"nodes": {"http://n1": node, "http://n2": {**node, "finished": 0}}}

    screen = Terminal()
    bars = NodeBars(screen)
    bars(job(0))
    bars(job(1))
    drawn = screen.getvalue()
    assert drawn.count("\x1b[2F") == 1  # the second drawing goes back over the first
    assert "http://n1  [##########----------]  1/2" in drawn
    log = io.StringIO()
    bars = NodeBars(log)
    for finished in (0, 1, 1, 2):
        bars(job(finished))
    lines = log.getvalue().splitlines()
    assert len(lines) == 4  # n1 at 0, 1, 2 and n2 once: only changes are written
    assert "\x1b" not in log.getvalue()


async def test_a_claim_not_renewed_is_taken_again_and_a_renewed_one_is_not(
    central_db_url: str, tmp_path: Path
) -> None:
    """A process that died mid-item stops renewing it; the node takes it again after the lease.

    On SQLite too (no FOR UPDATE there: its write transactions take the lock up front).
    """
    settings = central_settings(
        tmp_path / "quick",
        central_db_url,
        "http://127.0.0.1:9/quick",
        node_dead_after=0.5,
        node_heartbeat_interval=0.1,
    )
    driver = create_driver(settings)
    assert isinstance(driver, CentralDriver)
    try:
        job_id = driver.create_preheat_job(["a", "b"], ["all"])
        assert driver.claim_preheat_items(1) == [(job_id, "a")]
        assert driver.claim_preheat_items(5) == [(job_id, "b")]
        held = [(job_id, "b")]  # "b" is renewed, as a running process does; "a" is not
        taken: list[tuple[int, str]] = []

        async def a_taken_again() -> bool:
            driver.heartbeat()
            driver.touch_preheat_items(held)
            taken.extend(driver.claim_preheat_items(5))
            return bool(taken)

        await poll(a_taken_again, "the lapsed claim is taken again", within=10)
        assert taken == [(job_id, "a")]
    finally:
        driver.close()


def test_two_worker_processes_of_a_node_never_claim_the_same_item(
    central_db_url: str, tmp_path: Path
) -> None:
    """Workers of one node share its row; claims racing from both take disjoint items."""
    settings = central_settings(tmp_path / "node", central_db_url, "http://127.0.0.1:9/node")
    workers = [create_driver(settings), create_driver(settings)]
    try:
        first = workers[0]
        assert isinstance(first, CentralDriver)
        images = [f"img-{n:02d}" for n in range(40)]
        job_id = first.create_preheat_job(images, ["all"])
        claimed: list[list[tuple[int, str]]] = [[], []]
        start = threading.Barrier(2)

        def claim_all(n: int) -> None:
            worker = workers[n]
            assert isinstance(worker, CentralDriver)
            start.wait()
            while taken := worker.claim_preheat_items(3):
                claimed[n].extend(taken)

        threads = [threading.Thread(target=claim_all, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not set(claimed[0]) & set(claimed[1])
        assert sorted(claimed[0] + claimed[1]) == [(job_id, image) for image in images]
    finally:
        for worker in workers:
            worker.close()


def test_jobs_older_than_30_days_go_with_their_items_when_a_job_is_made(
    lone_node: CentralDriver,
) -> None:
    driver = lone_node
    old, recent = (driver.create_preheat_job(["a"], ["all"]) for _ in range(2))
    with driver._write() as conn:
        for job_id, days in ((old, 31), (recent, 29)):
            conn.execute(
                update(preheat_jobs)
                .where(preheat_jobs.c.id == job_id)
                .values(created_at=datetime.now(UTC) - timedelta(days=days))
            )
    new = driver.create_preheat_job(["a"], ["all"])
    assert driver.get_preheat_job(old) is None
    assert driver.get_preheat_job(recent) is not None
    with driver._read() as conn:
        jobs = conn.execute(select(preheat_items.c.job_id).distinct()).scalars().all()
    assert sorted(jobs) == [recent, new]
