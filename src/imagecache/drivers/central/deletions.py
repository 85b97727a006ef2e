"""Cluster-wide deletion: a mark every node honours at its next heartbeat."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy import (
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from imagecache.drivers.central.schema import (
    CentralStore,
    cached_images,
    deleted_images,
    deleted_since_made,
)

log = logging.getLogger(__name__)


class ClusterDeletions(CentralStore):
    """Deleting an image on every node, and applying the deletions made elsewhere."""

    def delete_everywhere(self, image_id: str) -> bool:
        """Mark the image deleted for every node and drop this node's copy now.

        Other nodes drop theirs at their next ``apply_deletions`` (the service
        runs it with every heartbeat). A copy filled after the mark is kept:
        the mark only condemns copies made before it.
        """
        image_id = self.layout.accept(image_id)
        self._require_online("deleting an image on every node")
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(deleted_images).values(
            image_id=image_id, deleted_at=datetime.now(UTC)
        )
        statement = statement.on_conflict_do_update(
            index_elements=[deleted_images.c.image_id],
            set_={"deleted_at": statement.excluded.deleted_at},
        )
        with self._write() as conn:
            conn.execute(statement)
        return self.delete_cached_image(image_id)

    def apply_deletions(self) -> list[str]:
        """Drop this node's copies of images marked deleted after they were made."""
        query = select(cached_images.c.image_id).where(
            cached_images.c.node_id == self.node_id, deleted_since_made()
        )
        with self._read() as conn:
            doomed = [image_id for (image_id,) in conn.execute(query)]
        for image_id in doomed:
            log.info("dropping %s: it was deleted through another node", image_id)
            self.delete_cached_image(image_id)
        return doomed
