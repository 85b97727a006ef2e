"""Each node's site, so a miss fills from a sibling at its own site first.

Revision ID: r0004
Revises: r0003

NOT NULL with a server default of '' ("no site"), rather than nullable: one
value means "no site", existing rows get it, and a node of the previous
release still running during a rolling upgrade inserts its row without the
column and gets it too.

No index on ``cached_images(node_id)`` with it: none is missing. Holder
lookups filter by image id (``ix_cached_images_image``), and every per-node
query (size, listing, LRU, the cascade from ``nodes``) already uses
``ix_cached_images_lru``, whose first column is ``node_id``. Checked with
EXPLAIN ANALYZE on PostgreSQL with 100 nodes of 1,000 images each: bitmap
index scans on those two indexes, under 1 ms each. Another index would only
cost writes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0004"
down_revision = "r0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("site", sa.String(63), nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("nodes", "site")
