"""Node identity and liveness in the cluster: who is alive, and who holds which image.

A node is its self URL (``worker_self_reference_url``), the address siblings
use to fetch images from it. Two live nodes must never share a URL, yet the
worker processes of one node, and that node restarted a second after it
stopped, must be let in. What tells them apart is the cache directory: each
directory gets a random id once (``<dir>/.node-id``; hidden names are never
image ids), stored with the node's row. The same URL with the same directory
id is the same node; with another id it is refused while the holder's
heartbeat is younger than ``node_dead_after``, and taken over (its rows
dropped, they describe files elsewhere) once it is older.

Liveness compares heartbeats written with each node's clock: nodes must keep
their clocks in sync (NTP) to well under ``node_dead_after``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from imagecache.drivers.central.schema import (
    IMAGE_COLUMNS,
    CentralStore,
    cached_images,
    deleted_since_made,
    nodes,
    row_to_image,
    to_datetime,
    to_epoch,
)
from imagecache.errors import BadDriverConfiguration, CacheStoreError
from imagecache.layout import fsync_dir
from imagecache.records import CachedImage, NodeInfo, NodeListing
from imagecache.sites import Sibling, in_reach

log = logging.getLogger(__name__)

NODE_ID_FILE = ".node-id"


def node_instance_id(base: Path) -> str:
    """The random id of this cache directory, created on first use.

    Several workers start together on a new directory, so the file appears
    whole or not at all: the id is written to a private temporary file, made
    durable, then linked into place; the first link wins and every process
    reads the winner's. (Created empty and written after, as it was, a sibling
    could read it in between, find it empty and die.)
    """
    path = base / NODE_ID_FILE
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        tmp = base / f"{NODE_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            try:
                os.write(fd, uuid.uuid4().hex.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process won: read theirs
                os.link(tmp, path)
                fsync_dir(base)
        finally:
            tmp.unlink(missing_ok=True)
        value = path.read_text().strip()
    if not value:
        raise BadDriverConfiguration("central", f"{path} is empty; remove it and restart")
    return value


def normalise_self_url(value: str) -> str:
    """The node URL as stored: no trailing slash; only http(s) URLs with a host."""
    url = value.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest:
        raise BadDriverConfiguration(
            "central",
            f"worker_self_reference_url must be an http(s) URL siblings can reach, got {value!r}",
        )
    return url


class NodeRegistry(CentralStore):
    """This node's row in ``nodes``: registration, heartbeats, and the live nodes' copies."""

    # --- nodes ---------------------------------------------------------------------------

    def _register(self) -> int:
        """Claim this node's URL; refuse it while another live node holds it."""
        for _ in range(3):
            now = datetime.now(UTC)
            try:
                with self._write() as conn:
                    row = conn.execute(
                        select(nodes.c.id, nodes.c.instance_id, nodes.c.heartbeat)
                        .where(nodes.c.url == self.self_url)
                        .with_for_update()
                    ).first()
                    if row is None:
                        return int(
                            conn.execute(
                                insert(nodes)
                                .values(
                                    url=self.self_url,
                                    instance_id=self.instance_id,
                                    heartbeat=now,
                                    started=now,
                                    site=self.config.site,
                                )
                                .returning(nodes.c.id)
                            ).scalar_one()
                        )
                    node_id, instance_id, heartbeat = row
                    if instance_id != self.instance_id:
                        age = now.timestamp() - to_epoch(heartbeat)
                        if age < self.config.node_dead_after:
                            raise BadDriverConfiguration(
                                self.name,
                                f"worker_self_reference_url {self.self_url} is already used by "
                                f"another live node (its cache directory differs; last heartbeat "
                                f"{age:.1f}s ago). Give each node its own URL, or wait "
                                f"node_dead_after={self.config.node_dead_after:g}s after "
                                "stopping the other one",
                            )
                        log.warning(
                            "taking over node URL %s from a dead node (heartbeat %.0fs ago); "
                            "dropping its rows, they describe another cache directory",
                            self.self_url,
                            age,
                        )
                        conn.execute(
                            delete(cached_images).where(cached_images.c.node_id == node_id)
                        )
                    conn.execute(
                        update(nodes)
                        .where(nodes.c.id == node_id)
                        .values(
                            instance_id=self.instance_id,
                            heartbeat=now,
                            started=now,
                            site=self.config.site,  # relabelled at a restart: the new one
                        )
                    )
                    return int(node_id)
            except CacheStoreError as exc:
                # Two first starts of one URL raced on the unique constraint: look again.
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise CacheStoreError(f"could not register node {self.self_url}: lost every race")

    def heartbeat(self) -> bool:
        """Tell the cluster this node is alive; False if another node took its URL or it left."""
        with self._beat_lock:
            if self._left:
                return False  # a beat still in flight when the node stopped must not revive it
            return self._beat()

    def _beat(self) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(nodes)
                .where(nodes.c.id == self.node_id, nodes.c.instance_id == self.instance_id)
                .values(heartbeat=datetime.now(UTC))
            )
        if result.rowcount == 0:
            log.error(
                "node URL %s now belongs to another cache directory; this node is not "
                "announced to the cluster any more (restart it with its own URL)",
                self.self_url,
            )
            return False
        return True

    def leave(self) -> None:
        """Tell the cluster this node is stopping: it is not offered as a source from now on.

        Its rows stay: when it comes back (same directory) its copies are offered again.
        Later heartbeats of this driver do nothing.
        """
        with self._beat_lock:
            self._left = True
            self._mark_gone()

    def _mark_gone(self) -> None:
        with self._write() as conn:
            conn.execute(
                update(nodes)
                .where(nodes.c.id == self.node_id, nodes.c.instance_id == self.instance_id)
                .values(heartbeat=to_datetime(0.0))
            )

    def _alive_cutoff(self) -> datetime:
        return to_datetime(time.time() - self.config.node_dead_after)

    def list_nodes(self) -> list[NodeInfo]:
        """Every registered node, dead or alive, by URL."""
        self._require_online("listing the nodes")
        cutoff = self._alive_cutoff()
        with self._read() as conn:
            rows = conn.execute(
                select(nodes.c.url, nodes.c.heartbeat, nodes.c.started, nodes.c.site).order_by(
                    nodes.c.url
                )
            ).all()
        return [
            NodeInfo(
                url=url,
                heartbeat=to_epoch(beat),
                started=to_epoch(started),
                alive=to_epoch(beat) > cutoff.timestamp(),
                site=site,
            )
            for url, beat, started, site in rows
        ]

    def count_live_nodes(self) -> int:
        """How many nodes beat within ``node_dead_after``: one row, whatever the cluster's size.

        For the heartbeat's gauge: listing every node at every beat made each
        beat cost O(nodes) rows, O(nodes²) for the cluster (bench/cluster_scale.py,
        docs/cluster.md "Scale").
        """
        self._require_online("counting the live nodes")
        query = (
            select(func.count()).select_from(nodes).where(nodes.c.heartbeat > self._alive_cutoff())
        )
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def get_cluster_images(self) -> list[tuple[str, CachedImage]]:
        """``(node URL, record)`` of every copy on every live node, by image id then URL."""
        self._require_online("listing the cluster's copies")
        query = (
            select(nodes.c.url, *IMAGE_COLUMNS)
            .select_from(cached_images.join(nodes, nodes.c.id == cached_images.c.node_id))
            .where(nodes.c.heartbeat > self._alive_cutoff(), ~deleted_since_made())
            .order_by(cached_images.c.image_id, nodes.c.url)
        )
        with self._read() as conn:
            return [(row[0], row_to_image(row[1:])) for row in conn.execute(query)]

    def cluster_listing(self) -> list[NodeListing]:
        """Every registered node with the copies it holds, by URL.

        A dead node is listed with no images: its copies are not offered to
        anyone until it beats again (as ``get_cached_nodes`` and fills see it).
        """
        held: dict[str, list[CachedImage]] = {}
        for url, image in self.get_cluster_images():
            held.setdefault(url, []).append(image)
        return [NodeListing(node, held.get(node.url, [])) for node in self.list_nodes()]

    def get_cached_nodes(self, image_id: str) -> list[str]:
        """URLs of the live nodes holding a copy not marked deleted since it was made."""
        return [sibling.url for sibling in self.get_cached_siblings(image_id)]

    def get_cached_siblings(self, image_id: str) -> list[Sibling]:
        """The live nodes holding a copy not marked deleted since it was made, with their sites."""
        image_id = self.layout.accept(image_id)
        self._require_online("finding the nodes holding an image")
        with self._read() as conn:
            rows = conn.execute(self._holders(image_id).order_by(nodes.c.url))
            return [Sibling(url, site) for url, site in rows]

    def in_reach(self, site: str) -> bool:
        """Whether this node fills from a sibling at ``site`` (its own, or any if cross-site)."""
        return in_reach(site, self.config.site, self.config.sibling_cross_site)

    def _holders(self, image_id: str) -> Any:
        """URL and site of the live nodes whose copy of ``image_id`` is not condemned (a query)."""
        return (
            select(nodes.c.url, nodes.c.site)
            .select_from(cached_images.join(nodes, nodes.c.id == cached_images.c.node_id))
            .where(
                cached_images.c.image_id == image_id,
                nodes.c.heartbeat > self._alive_cutoff(),
                ~deleted_since_made(),
            )
        )
