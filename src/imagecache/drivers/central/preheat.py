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

Cancelling a job (``cancel_preheat_job``) marks it and its pending items
``cancelled``; no node claims an item of a cancelled job again, even one
handed back or whose claim lapsed. An item running on a node is left to
finish and its outcome is written as usual.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, func, insert, or_, select, update

from imagecache.drivers.central.preheat_view import (
    CANCELLED,
    FINISHED,
    JOB_DONE,
    JOB_RUNNING,
    PENDING,
    RUNNING,
    PreheatJob,
    PreheatView,
)
from imagecache.drivers.central.schema import (
    nodes,
    preheat_items,
    preheat_jobs,
    to_datetime,
    to_epoch,
)
from imagecache.errors import BadPreheatRequest, PreheatJobFinished

ALL_NODES = "all"
# Bounds on one job, so one request cannot write an unbounded number of rows.
MAX_IMAGES = 100
MAX_ITEMS = 10_000
# Jobs are kept this long, then dropped with their items when a new job is made
# (no periodic task, no setting: a record of a month is what an operator looks
# back at). A node away longer than that no longer runs its items of them.
KEEP_JOBS = 30 * 86400.0


class PreheatJobs(PreheatView):
    """Making, running and cancelling preheat jobs (reading them: ``PreheatView``)."""

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
                        state=JOB_RUNNING,
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
        return max(self.settings.node_dead_after, 3 * self.settings.node_heartbeat_interval)

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
        # Not of a cancelled job: cancelling marks its pending items, but a
        # hand-back racing the cancel, or a claim that lapsed, leaves a row to take.
        cancelled_jobs = select(preheat_jobs.c.id).where(preheat_jobs.c.state == CANCELLED)
        query = (
            select(preheat_items.c.job_id, preheat_items.c.image_id)
            .where(mine, takeable, preheat_items.c.job_id.not_in(cancelled_jobs))
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
            if state == PENDING and self._job_state(conn, job_id) == CANCELLED:
                state = CANCELLED  # handed back after the cancel: it will not run again
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
                # A cancelled job stays cancelled: its last running item ending is not "done".
                conn.execute(
                    update(preheat_jobs)
                    .where(preheat_jobs.c.id == job_id, preheat_jobs.c.state == JOB_RUNNING)
                    .values(state=JOB_DONE)
                )

    @staticmethod
    def _job_state(conn: Connection, job_id: int) -> str | None:
        state = conn.execute(
            select(preheat_jobs.c.state).where(preheat_jobs.c.id == job_id)
        ).scalar_one_or_none()
        return None if state is None else str(state)

    # --- cancelling a job ----------------------------------------------------------------------

    def cancel_preheat_job(self, job_id: int) -> tuple[PreheatJob, int] | None:
        """Cancel a job: its pending items become ``cancelled``; the job, and how many that was.

        None for an unknown job. A job cancelled already is answered again
        (cancelling twice is one cancel: a retry after a lost answer must not
        fail). PreheatJobFinished when every item was written by its node
        already: there is nothing to cancel, and calling that job cancelled
        would hide its outcome. Items running on a node now are left to
        finish (docs/cluster.md, "Preheat jobs": a fill may be shared with
        clients, and its bytes are wanted anyway); they never run again.
        """
        now = datetime.now(UTC)
        with self._write() as conn:
            # FOR UPDATE: a node's last item ending now turns the job "done" or
            # waits for this; never both "done" and "cancelled".
            state = conn.execute(
                select(preheat_jobs.c.state).where(preheat_jobs.c.id == job_id).with_for_update()
            ).scalar_one_or_none()
            if state is None:
                return None
            marked = 0
            if state != CANCELLED:
                left = conn.execute(
                    select(func.count())
                    .select_from(preheat_items)
                    .where(preheat_items.c.job_id == job_id, preheat_items.c.state.not_in(FINISHED))
                ).scalar_one()
                if state == JOB_DONE or not left:
                    raise PreheatJobFinished(job_id)
                conn.execute(
                    update(preheat_jobs).where(preheat_jobs.c.id == job_id).values(state=CANCELLED)
                )
                marked = conn.execute(
                    update(preheat_items)
                    .where(preheat_items.c.job_id == job_id, preheat_items.c.state == PENDING)
                    .values(state=CANCELLED, reason="cancelled", updated_at=now)
                ).rowcount
        job = self.get_preheat_job(job_id)
        return (job, int(marked)) if job is not None else None

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
