"""Preheat jobs: images to cache on chosen nodes, and each node's outcome, in the cluster database.

A job is made by whichever node took the request (``create_preheat_job``):
one row in ``preheat_jobs`` and one ``pending`` item per node and image in
``preheat_items``. Each node runs its own items (``claim_preheat_items``, from
the service's cluster tasks), so a node never needs to reach another to do a
job's work, and writes each outcome (``finish_preheat_item``): ``cached``,
``failed`` with the reason, or ``skipped`` when it had the image already. Any
node answers for a job (``get_preheat_job``) because all of it is here.

A node that is down leaves its items pending. They are *reported* failed,
"node not live", while its heartbeat is older than ``node_dead_after``; that
is computed when the job is read, never written, so the node still runs them
when it comes back and the job completes then without being asked again
(within ``KEEP_JOBS``, after which a job and its items are dropped).

An item a node claimed stays ``running`` while that node's process keeps
touching it (``touch_preheat_items``, every heartbeat). A process that died
mid-item stops touching it, and the node's next process takes it again once
it is older than the claim lease: no item is lost to a crash.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, update

from imagecache.drivers.central.nodes import NodeRegistry
from imagecache.drivers.central.schema import (
    nodes,
    preheat_items,
    preheat_jobs,
    to_datetime,
    to_epoch,
)
from imagecache.errors import BadPreheatRequest

PENDING, RUNNING, CACHED, FAILED, SKIPPED = "pending", "running", "cached", "failed", "skipped"
FINISHED = frozenset({CACHED, FAILED, SKIPPED})  # as written by the node
HAS_IMAGE = frozenset({CACHED, SKIPPED})  # the node holds the image
ALL_NODES = "all"
# Bounds on one job, so one request cannot write an unbounded number of rows.
MAX_IMAGES = 100
MAX_ITEMS = 10_000
# Jobs are kept this long, then dropped with their items when a new job is made
# (no periodic task, no setting: a record of a month is what an operator looks
# back at). A node away longer than that no longer runs its items of them.
KEEP_JOBS = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class PreheatItem:
    """One node's outcome for one image of a job, as reported (liveness applied)."""

    node_url: str
    site: str
    alive: bool
    image_id: str
    state: str
    reason: str | None
    bytes: int | None
    updated_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "bytes": self.bytes,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class PreheatJob:
    """A job with every item; ``state`` is ``done`` once no item can change without a node."""

    job_id: int
    created_at: float
    created_by: str
    images: list[str]
    target: list[str]
    items: list[PreheatItem] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(item.state in FINISHED for item in self.items)

    @property
    def ok(self) -> bool:
        """Every node of the job holds every image."""
        return all(item.state in HAS_IMAGE for item in self.items)

    def as_dict(self) -> dict[str, Any]:
        per_node: dict[str, dict[str, Any]] = {}
        counts = dict.fromkeys((PENDING, RUNNING, CACHED, FAILED, SKIPPED), 0)
        for item in self.items:
            counts[item.state] += 1
            node = per_node.setdefault(
                item.node_url,
                {"site": item.site, "alive": item.alive, "total": 0, "finished": 0, "images": {}},
            )
            node["total"] += 1
            node["finished"] += item.state in FINISHED
            node["images"][item.image_id] = item.as_dict()
        for node in per_node.values():
            node["ok"] = all(entry["state"] in HAS_IMAGE for entry in node["images"].values())
        return {
            "id": self.job_id,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "images": self.images,
            "target": self.target,
            "state": "done" if self.done else "running",
            "ok": self.ok,
            "counts": counts,
            "nodes": per_node,
        }


class PreheatJobs(NodeRegistry):
    """Making, running and reading preheat jobs."""

    def create_preheat_job(self, images: list[str], target: list[str]) -> int:
        """Make a job of ``images`` on the nodes ``target`` names; its id.

        ``target`` entries are ``all`` (every live node), node URLs (registered
        nodes, live or not: a node named but down is reported, not dropped) or
        site labels (the live nodes of that site). BadPreheatRequest says what
        is wrong with them, InvalidImageId with an image id.
        """
        wanted = list(dict.fromkeys(self.layout.validate(image) for image in images))
        if not wanted:
            raise BadPreheatRequest("no images: name at least one image to preheat")
        if len(wanted) > MAX_IMAGES:
            raise BadPreheatRequest(f"too many images ({len(wanted)}); at most {MAX_IMAGES}")
        now = datetime.now(UTC)
        with self._write() as conn:
            conn.execute(
                delete(preheat_jobs).where(
                    preheat_jobs.c.created_at < to_datetime(now.timestamp() - KEEP_JOBS)
                )
            )
            chosen = self._resolve(conn, target)
            if len(chosen) * len(wanted) > MAX_ITEMS:
                raise BadPreheatRequest(
                    f"{len(chosen)} nodes x {len(wanted)} images is more than {MAX_ITEMS} items"
                )
            job_id = int(
                conn.execute(
                    insert(preheat_jobs)
                    .values(
                        created_at=now,
                        created_by=self.self_url,
                        images=json.dumps(wanted),
                        target=json.dumps(target),
                        state=RUNNING,
                    )
                    .returning(preheat_jobs.c.id)
                ).scalar_one()
            )
            conn.execute(
                insert(preheat_items),
                [
                    {
                        "job_id": job_id,
                        "node_id": node_id,
                        "image_id": image_id,
                        "state": PENDING,
                        "updated_at": now,
                    }
                    for node_id in chosen
                    for image_id in wanted
                ],
            )
        return job_id

    def _resolve(self, conn: Connection, target: list[str]) -> list[int]:
        """The node ids ``target`` names, in a stable order; BadPreheatRequest if it cannot."""
        entries = [entry.strip() for entry in target if entry.strip()]
        if not entries:
            raise BadPreheatRequest("no nodes: give 'all', a site, or node URLs")
        if ALL_NODES in entries and len(entries) > 1:
            raise BadPreheatRequest("nodes: 'all' already names every live node; give it alone")
        rows = conn.execute(select(nodes.c.id, nodes.c.url, nodes.c.site, nodes.c.heartbeat)).all()
        cutoff = self._alive_cutoff().timestamp()
        live = {node_id for node_id, _url, _site, beat in rows if to_epoch(beat) > cutoff}
        by_url = {url: node_id for node_id, url, _site, _beat in rows}
        chosen: dict[int, None] = {}
        for entry in entries:
            if entry == ALL_NODES:
                found = [node_id for node_id, *_ in rows if node_id in live]
                if not found:
                    raise BadPreheatRequest("nodes 'all': no node of the cluster is alive")
            elif "://" in entry:
                node_id = by_url.get(entry.rstrip("/"))
                if node_id is None:
                    raise BadPreheatRequest(f"unknown node {entry!r}: no node has that URL")
                found = [node_id]
            else:
                at_site = [node_id for node_id, _url, site, _beat in rows if site == entry]
                if not at_site:
                    raise BadPreheatRequest(f"unknown site {entry!r}: no node is at that site")
                found = [node_id for node_id in at_site if node_id in live]
                if not found:
                    raise BadPreheatRequest(f"site {entry!r}: none of its nodes is alive")
            chosen.update(dict.fromkeys(found))
        return list(chosen)

    # --- a node running its items ------------------------------------------------------------

    def _lease(self) -> float:
        """How long a claimed item is this process's without a touch (see the module doc)."""
        return max(self.config.node_dead_after, 3 * self.config.node_heartbeat_interval)

    def claim_preheat_items(self, limit: int) -> list[tuple[int, str]]:
        """Take up to ``limit`` of this node's pending items (oldest job first) to run now."""
        if limit <= 0:
            return []
        now = datetime.now(UTC)
        stale = to_datetime(time.time() - self._lease())
        mine = preheat_items.c.node_id == self.node_id
        takeable = or_(
            preheat_items.c.state == PENDING,
            and_(preheat_items.c.state == RUNNING, preheat_items.c.updated_at < stale),
        )
        query = (
            select(preheat_items.c.job_id, preheat_items.c.image_id)
            .where(mine, takeable)
            .order_by(preheat_items.c.job_id, preheat_items.c.image_id)
            .limit(limit)
            # Two worker processes of one node claim at once: each takes other rows.
            .with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            taken = [(int(job_id), str(image_id)) for job_id, image_id in conn.execute(query)]
            if taken:
                conn.execute(self._item_update(state=RUNNING, updated_at=now), self._keys(taken))
        return taken

    def touch_preheat_items(self, items: list[tuple[int, str]]) -> None:
        """Renew this process's claim on the items it is running."""
        if items:
            with self._write() as conn:
                conn.execute(
                    self._item_update(updated_at=datetime.now(UTC)).where(
                        preheat_items.c.state == RUNNING
                    ),
                    self._keys(items),
                )

    def finish_preheat_item(
        self,
        job_id: int,
        image_id: str,
        state: str,
        reason: str | None = None,
        size: int | None = None,
    ) -> None:
        """Write an item's outcome (or ``pending``: hand it back); the job is done with the last."""
        now = datetime.now(UTC)
        reason = reason[:2000] if reason else None
        with self._write() as conn:
            # Only a claimed item: a hand-back racing the item's own outcome (a
            # shutdown as it ends) must not turn "cached" back into "pending".
            conn.execute(
                self._item_update(state=state, reason=reason, bytes=size, updated_at=now).where(
                    preheat_items.c.state == RUNNING
                ),
                self._keys([(job_id, image_id)]),
            )
            left = conn.execute(
                select(func.count())
                .select_from(preheat_items)
                .where(preheat_items.c.job_id == job_id, preheat_items.c.state.not_in(FINISHED))
            ).scalar_one()
            if not left:
                conn.execute(
                    update(preheat_jobs).where(preheat_jobs.c.id == job_id).values(state="done")
                )

    def _item_update(self, **values: Any) -> Any:
        return (
            update(preheat_items)
            .where(
                preheat_items.c.node_id == self.node_id,
                preheat_items.c.job_id == bindparam("key_job"),
                preheat_items.c.image_id == bindparam("key_image"),
            )
            .values(**values)
        )

    @staticmethod
    def _keys(items: list[tuple[int, str]]) -> list[dict[str, Any]]:
        return [{"key_job": job_id, "key_image": image_id} for job_id, image_id in items]

    # --- reading a job -------------------------------------------------------------------------

    def get_preheat_job(self, job_id: int) -> PreheatJob | None:
        """The job with every item, or None; unfinished items of dead nodes read as failed."""
        cutoff = self._alive_cutoff().timestamp()
        with self._read() as conn:
            job = conn.execute(
                select(
                    preheat_jobs.c.created_at,
                    preheat_jobs.c.created_by,
                    preheat_jobs.c.images,
                    preheat_jobs.c.target,
                ).where(preheat_jobs.c.id == job_id)
            ).first()
            if job is None:
                return None
            rows = conn.execute(
                select(
                    nodes.c.url,
                    nodes.c.site,
                    nodes.c.heartbeat,
                    preheat_items.c.image_id,
                    preheat_items.c.state,
                    preheat_items.c.reason,
                    preheat_items.c.bytes,
                    preheat_items.c.updated_at,
                )
                .select_from(preheat_items.join(nodes, nodes.c.id == preheat_items.c.node_id))
                .where(preheat_items.c.job_id == job_id)
                .order_by(nodes.c.url, preheat_items.c.image_id)
            ).all()
        items = []
        for url, site, beat, image_id, state, reason, size, updated in rows:
            alive = to_epoch(beat) > cutoff
            if state not in FINISHED and not alive:
                ago = time.time() - to_epoch(beat)
                state = FAILED
                reason = (
                    "node not live (stopped)"
                    if to_epoch(beat) == 0
                    else f"node not live (last heartbeat {ago:.0f}s ago)"
                )
            items.append(
                PreheatItem(
                    node_url=url,
                    site=site,
                    alive=alive,
                    image_id=image_id,
                    state=state,
                    reason=reason,
                    bytes=int(size) if size is not None else None,
                    updated_at=to_epoch(updated),
                )
            )
        created_at, created_by, images, target = job
        return PreheatJob(
            job_id=job_id,
            created_at=to_epoch(created_at),
            created_by=created_by,
            images=json.loads(images),
            target=json.loads(target),
            items=items,
        )
