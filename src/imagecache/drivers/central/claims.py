"""Origin-fill claims: one node in the cluster reads a given image from the origin at a time."""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.exc import SQLAlchemyError

from imagecache.drivers.central.nodes import NodeRegistry
from imagecache.drivers.central.schema import (
    ORIGIN_LOCK_SPACE,
    brief,
    is_database_error,
    nodes,
    origin_fills,
    to_epoch,
)
from imagecache.errors import CacheStoreError

log = logging.getLogger(__name__)


class OriginClaim:
    """This node's right to read one image from the origin; ``release()`` when the read ends.

    On PostgreSQL the right is a session advisory lock held on a connection of
    its own: if the node dies the server drops the connection and the lock
    with it at once. SQLite has no such locks; there the ``origin_fills`` row
    is the claim, and a row whose node stopped beating is void.

    The row tells the other nodes whom to fetch from meanwhile, and it outlives
    ``release()``: it goes in the same transaction that records the committed
    copy (or when the fill rolls back). Deleting it when the origin read ends
    would leave a gap, between the last byte and the commit, in which the
    image is neither being filled nor cached as far as the cluster can see,
    and a node asking then would read the origin a second time.

    A claim is per site (``lock_name``): nodes do not follow a fill at
    another site, so each site reads an image from the origin once.
    """

    def __init__(
        self, driver: OriginClaims, image_id: str, site: str, conn: Connection | None
    ) -> None:
        self.driver = driver
        self.image_id = image_id
        self.site = site
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            unlock_origin(conn, self.image_id, self.site)


def lock_name(image_id: str, site: str) -> str:
    """What the advisory lock of an image's origin read at ``site`` hashes.

    The bare image id for no site, as before sites existed: a node of the
    previous release and a new one without a site still exclude each other
    during a rolling upgrade. Image ids never contain '/' (``Layout.validate``),
    so a site's name is never another image's bare id. (Two names that hash
    alike only make two reads wait for each other, as before.)
    """
    return f"{site}/{image_id}" if site else image_id


def unlock_origin(conn: Connection, image_id: str, site: str = "") -> None:
    """Drop the advisory lock of ``image_id`` held by ``conn``'s session, and the connection.

    A pooled connection keeps its session, and a session keeps its advisory
    locks: unlock explicitly, and if that fails discard the connection so the
    server ends the session (and the lock) rather than pooling it.
    """
    try:
        key = func.hashtext(lock_name(image_id, site))
        conn.execute(select(func.pg_advisory_unlock(ORIGIN_LOCK_SPACE, key)))
        conn.commit()
    except SQLAlchemyError as exc:
        log.warning("could not unlock the origin read of %s: %s", image_id, brief(exc))
        conn.invalidate()
    finally:
        conn.close()


class OriginClaims(NodeRegistry):
    """Claiming the origin read of an image, and finding the node that holds the claim."""

    def claim_origin_fill(
        self, image_id: str, unreachable: Collection[str] = ()
    ) -> OriginClaim | None:
        """Claim the one origin read of ``image_id`` in the cluster; None if another node has it.

        The row of a live node stands even when its lock is free: its read is
        over and its commit is on the way (see ``OriginClaim``). It is void when
        its node stopped beating, is this node, or is in ``unreachable`` (the
        caller could not fetch from it: it died before its heartbeat went stale).
        None too when a live node other than this one, and not in ``unreachable``,
        holds a copy at a site this node fetches from: the caller should fetch it
        from there.

        The claim is this node's site's (``OriginClaim``): a node reading the
        image at another site does not stop this one.
        """
        image_id = self.layout.accept(image_id)
        try:
            return self._claim(image_id, unreachable)
        except CacheStoreError as exc:
            if not is_database_error(exc):
                raise
            self._went_offline(exc)
            # With the database away, nobody can be asked: read the origin
            # alone (another node may read it too, which is cheaper than not
            # serving). The claim holds nothing; the commit is queued locally.
            log.warning(
                "reading %s from the origin without a claim: the cluster database is away (%s)",
                image_id,
                brief(exc),
            )
            return OriginClaim(self, image_id, self.config.site, None)

    def _claim(self, image_id: str, unreachable: Collection[str]) -> OriginClaim | None:
        self._require_online("claiming an origin read")
        now = datetime.now(UTC)
        site = self.config.site
        key = func.hashtext(lock_name(image_id, site))
        lock_conn: Connection | None = None
        if self.engine.dialect.name == "postgresql":
            try:
                lock_conn = self.engine.connect()
                got = lock_conn.execute(
                    select(func.pg_try_advisory_lock(ORIGIN_LOCK_SPACE, key))
                ).scalar_one()
                lock_conn.commit()  # the session lock outlives the transaction
            except SQLAlchemyError as exc:
                if lock_conn is not None:
                    lock_conn.close()
                raise CacheStoreError(f"central metadata: {brief(exc)}") from exc
            if not got:
                lock_conn.close()
                return None
        claimed = False
        try:
            with self._write() as conn:
                row = conn.execute(
                    select(origin_fills.c.node_id, nodes.c.url, nodes.c.heartbeat)
                    .select_from(origin_fills.join(nodes, nodes.c.id == origin_fills.c.node_id))
                    .where(origin_fills.c.image_id == image_id, origin_fills.c.site == site)
                ).first()
                if row is not None:
                    holder, url, beat = row
                    void = (
                        holder == self.node_id
                        or url in unreachable
                        or to_epoch(beat) < self._alive_cutoff().timestamp()
                    )
                    if not void:
                        return None
                    conn.execute(
                        delete(origin_fills).where(
                            origin_fills.c.image_id == image_id, origin_fills.c.site == site
                        )
                    )
                # Another node may have read and committed the image since the caller
                # last looked (its row went with its commit): fetch from it instead.
                # Only a holder this node would fetch from counts: one at another
                # site (sibling_cross_site off) leaves the origin read to this node.
                holders = conn.execute(self._holders(image_id)).all()
                if any(
                    url not in unreachable and url != self.self_url and self.in_reach(theirs)
                    for url, theirs in holders
                ):
                    return None
                conn.execute(
                    insert(origin_fills).values(
                        image_id=image_id, site=site, node_id=self.node_id, started=now
                    )
                )
                claimed = True
        finally:
            if not claimed and lock_conn is not None:
                unlock_origin(lock_conn, image_id, site)
        return OriginClaim(self, image_id, site, lock_conn)

    def origin_filler(self, image_id: str) -> str | None:
        """URL of a live node (not this one) reading ``image_id`` from the origin now.

        One at this node's site first; at another site only if this node
        fetches from there (``sibling_cross_site``).
        """
        self._require_online("finding the node reading an image")
        query = (
            select(nodes.c.url, origin_fills.c.site)
            .select_from(origin_fills.join(nodes, nodes.c.id == origin_fills.c.node_id))
            .where(
                origin_fills.c.image_id == image_id,
                origin_fills.c.node_id != self.node_id,
                nodes.c.heartbeat > self._alive_cutoff(),
            )
        )
        with self._read() as conn:
            fillers = conn.execute(query.order_by(origin_fills.c.site)).all()
        near = [url for url, site in fillers if site == self.config.site]
        far = [url for url, site in fillers if self.in_reach(site)]
        found = near or far
        return str(found[0]) if found else None

    def _forget_origin_fill(self, image_id: str) -> Any:
        """This node's ``origin_fills`` row of ``image_id`` (a statement): it no longer fills it."""
        return delete(origin_fills).where(
            origin_fills.c.image_id == image_id, origin_fills.c.node_id == self.node_id
        )
