"""Sites: a miss fills from a sibling at its own site, else the origin, across sites if told.

``choose_sibling`` is asked directly; then real ``imagecache serve`` processes
over one fresh PostgreSQL and the counting ``http_origin`` peer, as in
``test_cluster_multinode`` (``cluster_helpers``): two sites of two nodes each, and a pair of sites
whose nodes are allowed to fill from each other.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import aiohttp
import pytest

from central_db import NodeFactory, put
from cluster_helpers import DATA, DEADLINE, HALF, StartNode, download, holders
from imagecache.errors import ConfigurationError
from imagecache.settings import load_settings
from imagecache.sites import Sibling, choose_sibling
from server_helpers import ServeProcess

# --- the choice itself ------------------------------------------------------------------

A1, A2, B1, B2 = (f"http://{name}:9393" for name in ("a1", "a2", "b1", "b2"))


def test_a_sibling_at_the_same_site_comes_first() -> None:
    holders = [Sibling(B1, "b"), Sibling(A2, "a"), Sibling(B2, "b")]
    for seed in range(20):  # whatever the random pick, never the other site
        assert choose_sibling(holders, "a", False, rng=random.Random(seed)) == A2
        assert choose_sibling(holders, "a", True, rng=random.Random(seed)) == A2


def test_the_pick_spreads_over_the_same_site_holders() -> None:
    holders = [Sibling(A1, "a"), Sibling(A2, "a"), Sibling(B1, "b")]
    picks = {choose_sibling(holders, "a", True, rng=random.Random(seed)) for seed in range(50)}
    assert picks == {A1, A2}


def test_none_at_the_same_site_means_the_origin_unless_cross_site() -> None:
    holders = [Sibling(B1, "b"), Sibling(B2, "b")]
    assert choose_sibling(holders, "a", False) is None
    assert choose_sibling(holders, "a", True) in {B1, B2}
    assert choose_sibling([], "a", True) is None


def test_without_labels_every_sibling_is_at_the_same_site() -> None:
    holders = [Sibling(A1), Sibling(B1)]
    assert choose_sibling(holders, "", False) in {A1, B1}
    # A labelled node among unlabelled ones is at another site ("" is a site too).
    assert choose_sibling([Sibling(A1, "a")], "", False) is None
    assert choose_sibling([Sibling(A1)], "a", False) is None


def test_dead_and_skipped_siblings_are_never_chosen() -> None:
    holders = [Sibling(A1, "a", alive=False), Sibling(A2, "a"), Sibling(B1, "b", alive=False)]
    for seed in range(20):
        assert choose_sibling(holders, "a", True, skip={A2}, rng=random.Random(seed)) is None
        assert choose_sibling(holders, "a", True, rng=random.Random(seed)) == A2


@pytest.mark.parametrize(
    "bad", ["edge 1", " edge", "edge\t1", "-edge", "edge/1", "édge", "x" * 64, "a\n"]
)
def test_a_bad_site_label_is_a_settings_error(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="site: must"):
        load_settings(None, site=bad)


def test_good_site_labels_are_kept() -> None:
    for good in ("", "edge-paris-1", "DC2", "x" * 63, "a.b_c-d"):
        assert load_settings(None, site=good).site == good


# --- the driver: holders with sites, origin claims ---------------------------------------


def test_holders_carry_their_sites_and_claims_skip_other_sites(make_node: NodeFactory) -> None:
    """A holder at another site does not stop this node claiming the origin read."""
    b1 = make_node("b1", site="site-b")
    a1 = make_node("a1", site="site-a")
    near = make_node("a2", site="site-a")
    far_ok = make_node("c1", site="site-c", sibling_cross_site=True)
    put(b1, "img")
    assert a1.get_cached_siblings("img") == [Sibling(b1.self_url, "site-b")]
    assert {n.url: n.site for n in a1.list_nodes()}[b1.self_url] == "site-b"

    claim = a1.claim_origin_fill("img")
    assert claim is not None  # the only holder is at site B: read the origin
    try:
        # a1 is now reading the origin: its site-mate follows it, the cross-site node too...
        assert near.origin_filler("img") == a1.self_url
        assert far_ok.origin_filler("img") == a1.self_url
        # ...but site B's nodes do not (without sibling_cross_site they never fetch from A).
        assert b1.origin_filler("img") is None
    finally:
        claim.release()
    with a1._write() as conn:  # not filled after all: forget the claim row
        conn.execute(a1._forget_origin_fill("img"))
    # Allowed to cross sites, c1 fetches from B's copy instead of claiming the origin.
    assert far_ok.claim_origin_fill("img") is None


def test_each_site_claims_the_origin_read_of_an_image_once(make_node: NodeFactory) -> None:
    """Nodes do not follow a fill at another site, so each site has a claim of its own."""
    a1, a2 = make_node("a1", site="site-a"), make_node("a2", site="site-a")
    b1, b2 = make_node("b1", site="site-b"), make_node("b2", site="site-b")
    far_ok = make_node("c1", site="site-c", sibling_cross_site=True)
    claims = [a1.claim_origin_fill("img"), b1.claim_origin_fill("img")]
    try:
        assert None not in claims  # one per site, both at once
        assert a2.claim_origin_fill("img") is None  # a1 has site A's
        assert b2.claim_origin_fill("img") is None
        assert a2.origin_filler("img") == a1.self_url  # each follows its own site's read
        assert b2.origin_filler("img") == b1.self_url
        assert far_ok.origin_filler("img") in {a1.self_url, b1.self_url}
    finally:
        for claim in claims:
            if claim is not None:
                claim.release()


# --- real nodes -------------------------------------------------------------------------


def filled_from_sibling(node: ServeProcess, image_id: str) -> str | None:
    """The sibling URL the node's log says it filled ``image_id`` from, if any."""
    found = re.search(rf"filled {re.escape(image_id)} from sibling (\S+)$", node.log(), re.M)
    return found.group(1) if found else None


async def test_two_sites_fill_within_their_site_and_from_the_origin_otherwise(
    cluster_node: StartNode, http_origin: Any
) -> None:
    http_origin.add("img", DATA)
    a1, a2 = await cluster_node("a1", "site-a"), await cluster_node("a2", "site-a")
    b1, b2 = await cluster_node("b1", "site-b"), await cluster_node("b2", "site-b")
    async with aiohttp.ClientSession() as session:
        assert await download(session, b1, "img") == DATA
        assert http_origin.body_reads("img") == 1

        # Only site B holds it: a miss at A reads the origin, not the WAN to B.
        assert await download(session, a1, "img") == DATA
        assert http_origin.body_reads("img") == 2
        assert filled_from_sibling(a1, "img") is None

        # Now A and B both hold it: A's second node fills from A's copy, B's from B's.
        assert await holders(session, a2, "img") == sorted([a1.url, b1.url])
        assert await download(session, a2, "img") == DATA
        assert filled_from_sibling(a2, "img") == a1.url
        assert await download(session, b2, "img") == DATA
        assert filled_from_sibling(b2, "img") == b1.url
        assert http_origin.body_reads("img") == 2
        for served in (a1, a2, b1, b2):
            assert (served.cache_dir / "img").read_bytes() == DATA

        # The holders with their sites, for operators (the plain list stays Glance's).
        async with session.get(
            f"{b2.url}/v2/cache/nodes/img", params={"details": "true"}
        ) as response:
            assert response.status == 200, await response.text()
            detailed = await response.json()
        assert detailed == sorted(
            [
                {"url": a1.url, "site": "site-a"},
                {"url": a2.url, "site": "site-a"},
                {"url": b1.url, "site": "site-b"},
                {"url": b2.url, "site": "site-b"},
            ],
            key=lambda entry: entry["url"],
        )


async def test_cross_site_fills_from_another_site_before_the_origin(
    cluster_node: StartNode, http_origin: Any
) -> None:
    http_origin.add("img", DATA)
    b1 = await cluster_node("b1", "site-b")
    a1 = await cluster_node("a1", "site-a", cross_site=True)
    async with aiohttp.ClientSession() as session:
        assert await download(session, b1, "img") == DATA
        assert await download(session, a1, "img") == DATA
        assert filled_from_sibling(a1, "img") == b1.url
        assert http_origin.body_reads("img") == 1
        assert (a1.cache_dir / "img").read_bytes() == DATA


async def test_a_fill_in_progress_at_another_site_neither_stalls_nor_feeds_this_site(
    cluster_node: StartNode, http_origin: Any
) -> None:
    """Claims are per site: A reads the origin while B does, and A's second node follows A."""
    http_origin.add("img", DATA)
    gate = http_origin.gate("img", after=HALF)  # every origin read stops half way
    b1 = await cluster_node("b1", "site-b")
    a1, a2 = await cluster_node("a1", "site-a"), await cluster_node("a2", "site-a")
    async with aiohttp.ClientSession() as session:
        at_b = asyncio.create_task(download(session, b1, "img"))
        tasks = [at_b]
        try:
            await http_origin.wait_for_reads("img", 1, within=DEADLINE)
            tasks.append(asyncio.create_task(download(session, a1, "img")))
            # Well within the 15 s a follower waits for a claim (CLAIM_WAIT_LIMIT):
            # a1 does not wait for site B's read, it claims site A's own at once.
            await http_origin.wait_for_reads("img", 2, within=5.0)
            # a2 misses while both reads are held: it follows a1 (its fill in
            # progress, or its copy once committed), never b1 and never the origin.
            tasks.append(asyncio.create_task(download(session, a2, "img")))
        finally:
            gate.set()
            bodies = await asyncio.gather(*tasks, return_exceptions=True)
        assert bodies == [DATA, DATA, DATA]
    assert http_origin.body_reads("img") == 2  # one per site
    assert filled_from_sibling(a2, "img") == a1.url
    assert filled_from_sibling(a1, "img") is None
