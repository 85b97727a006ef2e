"""``GET /v2/cache/preheat`` (the job list) and ``DELETE /v2/cache/preheat/{id}`` (cancel).

The service in this process and a second node beside it (``preheat_helpers``).
Jobs are made on the second node ("far"), whose items nothing runs unless a
test claims them through its driver, so every state a test reads is one it made.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner
from sqlalchemy import update

from imagecache.cli import main
from imagecache.drivers.central import CentralDriver, preheat_items
from imagecache.settings import Settings
from preheat_helpers import ADMIN, DATA, TOKEN, ClientFactory, job, post
from server_helpers import directory_app

Client = TestClient[Any, Any]


async def listed(client: Client, query: str = "") -> list[dict[str, Any]]:
    async with client.get(f"/v2/cache/preheat{query}", headers=ADMIN) as response:
        assert response.status == 200, await response.text()
        jobs: list[dict[str, Any]] = (await response.json())["jobs"]
        return jobs


async def made(client: Client, images: list[str], nodes: list[str]) -> int:
    status, answer = await post(client, {"images": images, "nodes": nodes})
    assert status == 202, answer
    return int(answer["id"])


async def cancel(client: Client, job_id: int | str) -> tuple[int, Any]:
    async with client.delete(f"/v2/cache/preheat/{job_id}", headers=ADMIN) as response:
        return response.status, (
            await response.json() if response.status == 200 else await response.text()
        )


async def test_the_list_is_newest_first_with_counts_bounded_and_filtered(
    preheat_client: Client, other_node: CentralDriver
) -> None:
    first = await made(preheat_client, ["a"], ["far"])
    second = await made(preheat_client, ["a", "b"], ["far"])
    third = await made(preheat_client, ["b"], [other_node.self_url])
    jobs = await listed(preheat_client)
    assert [j["id"] for j in jobs] == [third, second, first]
    entry = jobs[1]
    assert entry["images"] == ["a", "b"]
    assert entry["target"] == ["far"]
    assert entry["node_count"] == 1
    assert entry["state"] == "running"
    assert entry["counts"] == {
        "pending": 2, "running": 0, "cached": 0, "failed": 0, "skipped": 0, "cancelled": 0
    }  # fmt: skip
    assert entry["href"] == f"/v2/cache/preheat/{second}"
    assert entry["created_at"] > 0
    assert [j["id"] for j in await listed(preheat_client, "?limit=2")] == [third, second]

    # The first job ends on its node; the second is cancelled.
    assert other_node.claim_preheat_items(1) == [(first, "a")]
    other_node.finish_preheat_item(first, "a", "cached", size=len(DATA))
    assert (await cancel(preheat_client, second))[0] == 200
    by_state = {
        state: [j["id"] for j in await listed(preheat_client, f"?state={state}")]
        for state in ("running", "done", "cancelled")
    }
    assert by_state == {"running": [third], "done": [first], "cancelled": [second]}
    done = (await listed(preheat_client, "?state=done&limit=1"))[0]
    assert (done["ok"], done["counts"]["cached"]) == (True, 1)

    # The node stopped: its pending items read failed, so its jobs are done (not running).
    other_node.leave()
    by_state = {
        state: [j["id"] for j in await listed(preheat_client, f"?state={state}")]
        for state in ("running", "done", "cancelled")
    }
    assert by_state == {"running": [], "done": [third, first], "cancelled": [second]}
    stopped = (await listed(preheat_client, "?limit=1"))[0]
    assert (stopped["state"], stopped["ok"], stopped["counts"]["failed"]) == ("done", False, 1)


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("?limit=0", "limit must be from 1 to 200, not 0"),
        ("?limit=201", "limit must be from 1 to 200, not 201"),
        ("?limit=ten", "limit must be a number, not 'ten'"),
        ("?limit=\u0663", "limit must be a number"),  # int() takes an Arabic-Indic 3
        ("?limit=-1", "limit must be a number"),
        ("?state=moon", "state must be one of running, done, cancelled, not 'moon'"),
        ("?state=", "state must be one of"),
        ("?limt=5", "unknown parameter 'limt'"),
        ("?limit=1&limit=2", "at most once"),
    ],
)
async def test_bad_list_parameters_are_400_naming_the_problem(
    preheat_client: Client, query: str, named: str
) -> None:
    async with preheat_client.get(f"/v2/cache/preheat{query}", headers=ADMIN) as response:
        assert response.status == 400
        assert named in await response.text()


async def test_listing_and_cancelling_are_admin_only(
    preheat_client: Client, other_node: CentralDriver
) -> None:
    job_id = await made(preheat_client, ["a"], ["far"])
    for headers in ({}, {"X-Auth-Token": "wrong"}):
        async with preheat_client.get("/v2/cache/preheat", headers=headers) as response:
            assert response.status == 403
        async with preheat_client.delete(f"/v2/cache/preheat/{job_id}", headers=headers) as r:
            assert r.status == 403
    assert (await job(preheat_client, job_id))["state"] == "running"  # not cancelled
    assert [j["id"] for j in await listed(preheat_client)] == [job_id]  # the admin is let in
    assert other_node.claim_preheat_items(5) == [(job_id, "a")]


async def test_without_the_central_driver_listing_and_cancelling_are_409(
    aiohttp_client: ClientFactory, make_settings: Callable[..., Settings], preheat_origin: Path
) -> None:
    client = await aiohttp_client(directory_app(make_settings(admin_token=TOKEN), preheat_origin))
    async with client.get("/v2/cache/preheat", headers=ADMIN) as response:
        assert response.status == 409
        assert "centralized caching is not enabled" in await response.text()
    status, text = await cancel(client, 1)
    assert status == 409
    assert "centralized caching is not enabled" in text
    async with client.get("/v2/cache/preheat", headers={}) as response:
        assert response.status == 403


async def test_cancel_stops_pending_items_and_lets_a_running_one_finish(
    preheat_client: Client, other_node: CentralDriver
) -> None:
    job_id = await made(preheat_client, ["a", "b"], ["far"])
    assert other_node.claim_preheat_items(1) == [(job_id, "a")]  # "a" runs on the node now
    status, body = await cancel(preheat_client, job_id)
    assert status == 200, body
    assert (body["state"], body["cancelled_now"], body["ok"]) == ("cancelled", 1, False)
    images = body["nodes"][other_node.self_url]["images"]
    assert (images["a"]["state"], images["b"]["state"]) == ("running", "cancelled")
    assert other_node.claim_preheat_items(10) == []  # "b" is never claimed

    # The running item ends as usual, and the job stays cancelled.
    other_node.finish_preheat_item(job_id, "a", "cached", size=len(DATA))
    body = await job(preheat_client, job_id)
    assert body["state"] == "cancelled"
    assert body["nodes"][other_node.self_url]["images"]["a"]["state"] == "cached"
    assert (body["counts"]["cached"], body["counts"]["cancelled"]) == (1, 1)

    # Cancelling again answers the same job: a retry after a lost answer is not an error.
    status, again = await cancel(preheat_client, job_id)
    assert (status, again["state"], again["cancelled_now"]) == (200, "cancelled", 0)


async def test_an_item_handed_back_after_the_cancel_is_never_claimed(
    preheat_client: Client, other_node: CentralDriver
) -> None:
    """A node's shutdown hands its running item back just as the job is cancelled."""
    job_id = await made(preheat_client, ["a", "b"], ["far"])
    assert other_node.claim_preheat_items(1) == [(job_id, "a")]
    assert (await cancel(preheat_client, job_id))[0] == 200
    other_node.finish_preheat_item(job_id, "a", "pending")  # the hand-back, after the cancel
    # And the race the other way: the hand-back written after the cancel's own update.
    with other_node._write() as conn:
        conn.execute(
            update(preheat_items)
            .where(preheat_items.c.job_id == job_id, preheat_items.c.image_id == "b")
            .values(state="pending")
        )
    assert other_node.claim_preheat_items(10) == []
    body = await job(preheat_client, job_id)
    states = {i: e["state"] for i, e in body["nodes"][other_node.self_url]["images"].items()}
    assert states == {"a": "cancelled", "b": "cancelled"}
    assert body["state"] == "cancelled"


async def test_cancelling_an_unknown_or_finished_job(
    preheat_client: Client, other_node: CentralDriver
) -> None:
    assert (await cancel(preheat_client, 999))[0] == 404
    status, text = await cancel(preheat_client, "x1")
    assert status == 400
    assert "job id must be a number" in text
    job_id = await made(preheat_client, ["a"], ["far"])
    assert other_node.claim_preheat_items(1) == [(job_id, "a")]
    other_node.finish_preheat_item(job_id, "a", "failed", "origin said no")
    status, text = await cancel(preheat_client, job_id)
    assert status == 409
    assert f"preheat job {job_id} is finished" in text
    body = await job(preheat_client, job_id)
    assert (body["state"], body["counts"]["failed"]) == ("done", 1)  # its outcome kept


async def test_the_cli_lists_cancels_and_follows_a_cancelled_job(
    preheat_client: Client, other_node: CentralDriver
) -> None:
    url = str(preheat_client.make_url("")).rstrip("/")
    base = ["--url", url, "--token", TOKEN]

    def run(*argv: str) -> Any:
        return CliRunner().invoke(main, [*base, *argv])

    job_id = await made(preheat_client, ["a", "b"], ["far"])
    shown = await asyncio.to_thread(run, "preheat", "--list")
    assert shown.exit_code == 0, shown.output
    header, _rule, row = shown.stdout.splitlines()
    assert header.split() == [
        "Id", "Created", "State", "Images", "Nodes",
        "Cached", "Skipped", "Failed", "Pending", "Running", "Cancelled",
    ]  # fmt: skip
    cells = row.split()
    assert cells[1].endswith("Z")  # the time it was made, in UTC
    del cells[1]
    assert cells == [str(job_id), "running", "a,b", "far", "0", "0", "0", "2", "0", "0"]

    cancelled = await asyncio.to_thread(run, "preheat", "--cancel", str(job_id))
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout == f"Preheat job {job_id} cancelled: 2 pending items will not run.\n"
    assert other_node.claim_preheat_items(10) == []

    as_json = await asyncio.to_thread(run, "--json", "preheat", "--list", "--state", "cancelled")
    assert [j["id"] for j in json.loads(as_json.stdout)["jobs"]] == [job_id]
    followed = await asyncio.to_thread(run, "preheat", "--job", str(job_id), "--timeout", "5")
    assert followed.exit_code == 5, followed.output
    assert f"Preheat job {job_id} cancelled: some nodes lack some images" in followed.stdout

    unknown = await asyncio.to_thread(run, "preheat", "--cancel", "999")
    assert (unknown.exit_code, unknown.output) == (1, f"Error: no preheat job 999 at {url}\n")
    assert other_node.claim_preheat_items(10) == []
    for argv in (
        ["preheat", "--list", "--cancel", "1"],
        ["preheat", "--list", "a"],
        ["preheat", "--cancel", "1", "--limit", "3"],
        ["preheat", "--state", "done"],
    ):
        refused = await asyncio.to_thread(run, *argv)
        assert refused.exit_code == 2, (argv, refused.output)
    empty = await asyncio.to_thread(run, "preheat", "--list", "--state", "done")
    assert (empty.exit_code, empty.stdout) == (0, "No preheat jobs.\n")


def test_the_driver_lists_and_cancels_on_either_database(lone_node: CentralDriver) -> None:
    """The same reading and cancel on SQLite (no FOR UPDATE there) as on PostgreSQL."""
    driver = lone_node
    old, new = (driver.create_preheat_job(["a", "b"], ["all"]) for _ in range(2))
    assert driver.claim_preheat_items(1) == [(old, "a")]
    cancelled = driver.cancel_preheat_job(old)
    assert cancelled is not None
    assert (cancelled[0].as_dict()["state"], cancelled[1]) == ("cancelled", 1)
    assert driver.cancel_preheat_job(12345) is None
    assert driver.claim_preheat_items(10) == [(new, "a"), (new, "b")]
    summaries = {s.job_id: s.as_dict() for s in driver.list_preheat_jobs()}
    assert list(summaries) == [new, old]
    assert summaries[old]["counts"]["running"] == 1
    assert summaries[new]["counts"]["running"] == 2
    assert [s.job_id for s in driver.list_preheat_jobs(state="cancelled")] == [old]
    assert [s.job_id for s in driver.list_preheat_jobs(1, "running")] == [new]
