"""Write-behind: this node's local rows reach the cluster database, now or when it is back.

Every change of a local row is queued in the mirror's outbox by a trigger
(``mirror.py``). ``push`` writes the rows of some images at once, after a
change of the service (a commit, a deletion, a pin: the cluster should know
soon); ``drain`` writes the whole outbox, and the service runs it with every
heartbeat (``sync``), which is how hit counts travel (never on a hit's path).
A row is written whole, its hit count as the local absolute count: the local
row is the truth for this node, and an absolute value can be written twice
(a retry after a commit whose answer was lost) without counting hits twice.

While the database cannot be reached the node is *offline*: changes stay in
the outbox, nothing waits for the database again until the next heartbeat
(or ``node_heartbeat_interval`` later), and ``sync`` brings it back: beat,
drain, then ``resync`` (the database's rows of this node become exactly the
local ones) and the deletions made elsewhere meanwhile.

Pushes are serialised across the processes of a node (a lock file): two
workers writing the same image's row could otherwise put an older state over
a newer one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Iterator

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from imagecache.drivers.central.mirror import Mirror, image_values
from imagecache.drivers.central.schema import (
    CentralStore,
    brief,
    cached_images,
    deleted_images,
    is_database_error,
    to_epoch,
)
from imagecache.errors import CacheStoreError, CentralUnavailable

log = logging.getLogger(__name__)

DRAIN_BATCH = 500  # rows per transaction of a drain
_KEY = ("image_id", "node_id")


class WriteBehind(CentralStore):
    """The outbox's drain, the node's online/offline state, and the resync after an absence."""

    mirror: Mirror
    _push_lock: threading.Lock
    _offline_since: float | None  # time.time() of the first failure of this absence
    _retry_at: float  # time.monotonic() after which the database is tried again
    _offline_reason: str
    _resync_due: bool

    def _init_write_behind(self) -> None:
        self._push_lock = threading.Lock()
        self._offline_since = None
        self._retry_at = 0.0
        self._offline_reason = ""
        self._resync_due = False

    # --- state -------------------------------------------------------------------------

    @property
    def offline(self) -> bool:
        """The cluster database failed last time and has not answered since."""
        return self._offline_since is not None

    def _worth_trying(self) -> bool:
        return self._offline_since is None or time.monotonic() >= self._retry_at

    def _went_offline(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.config.node_heartbeat_interval
        self._offline_reason = brief(exc)
        if self._offline_since is None:
            self._offline_since = time.time()
            self._resync_due = True
            log.warning(
                "the cluster database cannot be reached (%s): serving from the local "
                "records, filling from the origin, queueing changes (%d images queued)",
                self._offline_reason,
                self.mirror.depth(),
            )

    def _came_back(self) -> None:
        if self._offline_since is not None:
            log.info(
                "the cluster database answers again after %.0f s",
                time.time() - self._offline_since,
            )
            self._offline_since = None

    def _require_online(self, what: str) -> None:
        """Fail at once, not after a connect timeout, while the database is known away."""
        if not self._worth_trying():
            raise CentralUnavailable(
                f"central metadata: {what} needs the cluster database, which cannot be reached"
                f" ({self._offline_reason})"
            )

    def database_state(self) -> tuple[bool, str]:
        """For readiness: whether the cluster database answers, and what is queued for it."""
        depth = self.mirror.depth()
        queued = f"{depth} images have changes queued locally (outbox)"
        if not self._worth_trying():  # failed within the last heartbeat interval: say so now
            return False, f"the central database does not answer: {self._offline_reason}; {queued}"
        try:
            with self._read() as conn:
                conn.execute(select(1))
        except CacheStoreError as exc:
            return False, f"the central database does not answer: {brief(exc)}; {queued}"
        queued = f"; {depth} images have changes not yet written to it (outbox)" if depth else ""
        return True, f"the central database answers{queued}"

    # --- writing -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _pushing(self, wait: float | None = None) -> Iterator[None]:
        """Hold the node's push lock; with ``wait``, give up (CentralUnavailable) after it.

        A commit or a deletion waits at most ``database_timeout``: if a push
        of another thread or worker is stuck on the database that long, the
        change stays queued and the request goes on (the drain has no hurry).
        """
        deadline = None if wait is None else time.monotonic() + wait
        if not self._push_lock.acquire(timeout=-1 if wait is None else wait):
            raise CentralUnavailable("central metadata: the database is busy with another push")
        try:
            with open(self.layout.lock_path("central-outbox"), "a") as lock:
                if deadline is None:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                else:
                    while True:
                        try:
                            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except BlockingIOError:
                            if time.monotonic() >= deadline:
                                raise CentralUnavailable(
                                    "central metadata: another process's push holds the lock"
                                ) from None
                            time.sleep(0.01)  # a lock poll, bounded by the deadline
                yield
        finally:
            self._push_lock.release()

    def push(self, image_ids: list[str]) -> None:
        """Write these images' rows now if the database is there; else leave them queued."""
        for start in range(0, len(image_ids), DRAIN_BATCH):  # a clear of 100k images, too
            if not self._worth_trying():
                return
            batch = image_ids[start : start + DRAIN_BATCH]
            try:
                with self._pushing(self.config.database_timeout):
                    entries = [(self.mirror.pending_version(i), i) for i in batch]
                    queued = [(version, i) for version, i in entries if version is not None]
                    with self._write() as conn:
                        doomed = self._write_rows(conn, [i for _, i in queued])
                    self.mirror.pushed(queued)
            except CacheStoreError as exc:
                if not is_database_error(exc):
                    raise
                self._went_offline(exc)
                return
            self._came_back()
            self._condemn(doomed)

    def drain(self) -> int:
        """Write the whole outbox to the database; how many images were written."""
        written = 0
        while True:
            with self._pushing():
                entries = self.mirror.pending(DRAIN_BATCH)
                if not entries:
                    return written
                with self._write() as conn:
                    doomed = self._write_rows(conn, [i for _, i in entries])
                self.mirror.pushed(entries)
            self._came_back()
            self._condemn(doomed)
            written += len(entries)
            if len(entries) < DRAIN_BATCH:
                return written

    def _write_rows(self, conn: Connection, image_ids: list[str]) -> list[str]:
        """Make this node's rows of these images the local ones; returns those to drop.

        An image committed while the database was away whose deletion (through
        any node) is newer than its fill's start is not published: it is
        dropped here instead, as ``_meta_commit`` would have refused it.
        """
        if not image_ids:
            return []
        records = self.mirror.rows(image_ids)
        unchecked = self.mirror.unchecked(image_ids)
        doomed: list[str] = []
        # Only a copy still here can be condemned (once dropped, it is simply gone;
        # checking it again from within its own deletion would wait on its lock).
        present = [i for i in unchecked if i in records]
        if present:
            marks = conn.execute(
                select(deleted_images.c.image_id, deleted_images.c.deleted_at).where(
                    deleted_images.c.image_id.in_(present)
                )
            ).all()
            doomed = [i for i, at in marks if to_epoch(at) >= unchecked[i]]
        gone = [i for i in image_ids if i not in records or i in doomed]
        if gone:
            conn.execute(
                delete(cached_images).where(
                    cached_images.c.node_id == self.node_id, cached_images.c.image_id.in_(gone)
                )
            )
        rows = [image_values(r, self.node_id) for i, r in records.items() if i not in doomed]
        if rows:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(cached_images)
            statement = statement.on_conflict_do_update(
                index_elements=[cached_images.c.image_id, cached_images.c.node_id],
                set_={
                    k: statement.excluded[k] for k in rows[0] if k not in ("image_id", "node_id")
                },
            )
            conn.execute(statement, rows)
        if unchecked:
            self.mirror.checked([i for i in unchecked if i not in doomed])
        return doomed

    def _condemn(self, doomed: list[str]) -> None:
        for image_id in doomed:
            log.warning(
                "dropping %s: it was committed while the cluster database was away, and "
                "deleted through another node after its fill began",
                image_id,
            )
            self.delete_cached_image(image_id)
            self.mirror.checked([image_id])

    def resync(self) -> None:
        """Make the database's rows of this node exactly the local ones (ids; rows by drain)."""
        with self._read() as conn:
            central = set(
                conn.execute(
                    select(cached_images.c.image_id).where(cached_images.c.node_id == self.node_id)
                ).scalars()
            )
        local = {image_id for image_id, _ in self.mirror.iter_sizes()}
        differ = sorted(central ^ local)
        if differ:
            log.info("resyncing %d rows of this node with the cluster database", len(differ))
            self.mirror.mark(differ)
        self.drain()
        self._resync_due = False
