"""Reading preheat jobs: one job with every item, and the list of jobs with their counts.

What an operator reads is computed at read time from what the nodes wrote
(``preheat.py``): an unfinished item of a node that is not live reads as
``failed`` ("node not live"), and a pending item of a cancelled job reads as
``cancelled`` (``cancel_preheat_job`` writes that, but a node's hand-back
racing the cancel can leave one ``pending``; nothing claims it, see
``claim_preheat_items``). The list filters on the same reading, in SQL, so a
job listed as ``done`` is one that ``GET`` reports ``done``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, exists, func, select

from imagecache.drivers.central.nodes import NodeRegistry
from imagecache.drivers.central.schema import nodes, preheat_items, preheat_jobs, to_epoch
from imagecache.errors import BadPreheatRequest

PENDING, RUNNING, CACHED, FAILED, SKIPPED = "pending", "running", "cached", "failed", "skipped"
CANCELLED = "cancelled"
ITEM_STATES = (PENDING, RUNNING, CACHED, FAILED, SKIPPED, CANCELLED)
FINISHED = frozenset({CACHED, FAILED, SKIPPED, CANCELLED})  # no node will change it
HAS_IMAGE = frozenset({CACHED, SKIPPED})  # the node holds the image
# A job's state: in the table, "running" until its last item is written, then
# "done"; "cancelled" once cancelled (and never anything else afterwards).
JOB_RUNNING, JOB_DONE = "running", "done"
JOB_STATES = (JOB_RUNNING, JOB_DONE, CANCELLED)
# One page of the job list: the default and the most one request may ask for
# (each job's counts are one grouped read of its items; 200 keeps it small).
LIST_DEFAULT = 20
LIST_MAX = 200


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


def _reading(state: str, alive: bool, job_cancelled: bool) -> str:
    """An item's state as reported: what its node wrote, unless it can no longer move."""
    if state == PENDING and job_cancelled:
        return CANCELLED
    if state not in FINISHED and not alive:
        return FAILED
    return state


def _job_state(cancelled: bool, items_finished: bool) -> str:
    if cancelled:
        return CANCELLED
    return JOB_DONE if items_finished else JOB_RUNNING


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a job was asked to do, and by which node when."""

    job_id: int
    created_at: float
    created_by: str
    images: list[str]
    target: list[str]

    def _asked(self) -> dict[str, Any]:
        return {
            "id": self.job_id,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "images": self.images,
            "target": self.target,
        }


@dataclass(frozen=True, slots=True)
class PreheatJob(_Asked):
    """A job with every item; ``state`` is ``done`` once no item can change without a node."""

    items: list[PreheatItem] = field(default_factory=list)
    cancelled: bool = False

    @property
    def done(self) -> bool:
        """Nothing more will be written without a node coming back (or: cancelled)."""
        return self.cancelled or all(item.state in FINISHED for item in self.items)

    @property
    def ok(self) -> bool:
        """Every node of the job holds every image."""
        return all(item.state in HAS_IMAGE for item in self.items)

    def as_dict(self) -> dict[str, Any]:
        per_node: dict[str, dict[str, Any]] = {}
        counts = dict.fromkeys(ITEM_STATES, 0)
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
            **self._asked(),
            "state": _job_state(self.cancelled, self.done),
            "ok": self.ok,
            "counts": counts,
            "nodes": per_node,
        }


@dataclass(frozen=True, slots=True)
class PreheatJobSummary(_Asked):
    """A job as the list shows it: what was asked and how many items are in each state."""

    state: str
    node_count: int
    counts: dict[str, int]

    @property
    def ok(self) -> bool:
        """Every node of the job holds every image (as ``PreheatJob.ok``)."""
        return self.counts[CACHED] + self.counts[SKIPPED] == sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            **self._asked(),
            "state": self.state,
            "ok": self.ok,
            "node_count": self.node_count,
            "counts": self.counts,
            "href": f"/v2/cache/preheat/{self.job_id}",
        }


class PreheatView(NodeRegistry):
    """Reading jobs (``PreheatJobs`` makes and runs them)."""

    def get_preheat_job(self, job_id: int) -> PreheatJob | None:
        """The job with every item, or None; unfinished items of dead nodes read as failed."""
        with self._read() as conn:
            job = conn.execute(
                select(
                    preheat_jobs.c.created_at,
                    preheat_jobs.c.created_by,
                    preheat_jobs.c.images,
                    preheat_jobs.c.target,
                    preheat_jobs.c.state,
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
        created_at, created_by, images, target, job_state = job
        cancelled = job_state == CANCELLED
        cutoff = self._alive_cutoff().timestamp()
        items = []
        for url, site, beat, image_id, state, reason, size, updated in rows:
            alive = to_epoch(beat) > cutoff
            shown = _reading(state, alive, cancelled)
            if shown == FAILED and state != FAILED:
                reason = (
                    "node not live (stopped)"
                    if to_epoch(beat) == 0
                    else f"node not live (last heartbeat {time.time() - to_epoch(beat):.0f}s ago)"
                )
            items.append(
                PreheatItem(
                    node_url=url,
                    site=site,
                    alive=alive,
                    image_id=image_id,
                    state=shown,
                    reason=reason,
                    bytes=int(size) if size is not None else None,
                    updated_at=to_epoch(updated),
                )
            )
        return PreheatJob(
            job_id=job_id,
            created_at=to_epoch(created_at),
            created_by=created_by,
            images=json.loads(images),
            target=json.loads(target),
            items=items,
            cancelled=cancelled,
        )

    def list_preheat_jobs(
        self, limit: int | None = None, state: str | None = None
    ) -> list[PreheatJobSummary]:
        """The newest ``limit`` jobs (in ``state``, as reported), newest first, with counts.

        BadPreheatRequest names a ``limit`` out of 1..LIST_MAX or an unknown ``state``.
        """
        if limit is None:
            limit = LIST_DEFAULT
        if not 1 <= limit <= LIST_MAX:
            raise BadPreheatRequest(f"limit must be from 1 to {LIST_MAX}, not {limit}")
        if state is not None and state not in JOB_STATES:
            raise BadPreheatRequest(
                f"state must be one of {', '.join(JOB_STATES)}, not {state[:40]!r}"
            )
        cutoff = self._alive_cutoff()
        # A job reads "running" while some item of a live node can still change.
        still_moving = exists(
            select(preheat_items.c.job_id)
            .select_from(preheat_items.join(nodes, nodes.c.id == preheat_items.c.node_id))
            .where(
                preheat_items.c.job_id == preheat_jobs.c.id,
                preheat_items.c.state.in_((PENDING, RUNNING)),
                nodes.c.heartbeat > cutoff,
            )
        )
        query = select(
            preheat_jobs.c.id,
            preheat_jobs.c.created_at,
            preheat_jobs.c.created_by,
            preheat_jobs.c.images,
            preheat_jobs.c.target,
            preheat_jobs.c.state,
        )
        not_cancelled = preheat_jobs.c.state != CANCELLED
        if state == CANCELLED:
            query = query.where(preheat_jobs.c.state == CANCELLED)
        elif state == JOB_RUNNING:
            query = query.where(and_(not_cancelled, still_moving))
        elif state == JOB_DONE:
            query = query.where(and_(not_cancelled, ~still_moving))
        query = query.order_by(preheat_jobs.c.id.desc()).limit(limit)
        with self._read() as conn:
            jobs = conn.execute(query).all()
            if not jobs:
                return []
            alive = case((nodes.c.heartbeat > cutoff, True), else_=False)
            grouped = conn.execute(
                select(
                    preheat_items.c.job_id,
                    preheat_items.c.state,
                    alive.label("alive"),
                    func.count().label("n"),
                )
                .select_from(preheat_items.join(nodes, nodes.c.id == preheat_items.c.node_id))
                .where(preheat_items.c.job_id.in_([row[0] for row in jobs]))
                .group_by(preheat_items.c.job_id, preheat_items.c.state, alive)
            ).all()
            node_counts: dict[int, int] = dict(
                conn.execute(
                    select(preheat_items.c.job_id, func.count(preheat_items.c.node_id.distinct()))
                    .where(preheat_items.c.job_id.in_([row[0] for row in jobs]))
                    .group_by(preheat_items.c.job_id)
                ).all()
            )
        by_job: dict[int, list[tuple[str, bool, int]]] = {}
        for item_job, item_state, live, n in grouped:
            by_job.setdefault(int(item_job), []).append((item_state, bool(live), int(n)))
        return [_summary(row, by_job.get(int(row[0]), []), node_counts) for row in jobs]


def _summary(
    row: Any, groups: list[tuple[str, bool, int]], node_counts: dict[int, int]
) -> PreheatJobSummary:
    job_id, created_at, created_by, images, target, job_state = row
    cancelled = job_state == CANCELLED
    counts = dict.fromkeys(ITEM_STATES, 0)
    for state, alive, n in groups:
        # The same reading as get_preheat_job, item by item.
        counts[_reading(state, alive, cancelled)] += n
    return PreheatJobSummary(
        job_id=int(job_id),
        created_at=to_epoch(created_at),
        created_by=created_by,
        images=json.loads(images),
        target=json.loads(target),
        state=_job_state(cancelled, not counts[PENDING] + counts[RUNNING]),
        node_count=int(node_counts.get(job_id, 0)),
        counts=counts,
    )
