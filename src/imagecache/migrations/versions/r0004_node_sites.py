"""Each node's site, so a miss fills from a sibling at its own site first; claims per site.

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

``origin_fills`` is keyed by ``(image_id, site)``: one origin read of an image
per site, since a node does not follow a fill at another site (unless
``sibling_cross_site``). Its rows (claims in flight) are copied with site ''.
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
    # A new primary key: a new table, the same way on PostgreSQL and SQLite
    # (SQLite cannot alter one), the rows copied across.
    op.create_table(
        "origin_fills_by_site",
        sa.Column("image_id", sa.String(255), nullable=False),
        sa.Column("site", sa.String(63), nullable=False, server_default=""),
        sa.Column(
            "node_id", sa.Integer, sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("image_id", "site", name="origin_fills_site_pkey"),
    )
    op.execute(
        "INSERT INTO origin_fills_by_site (image_id, site, node_id, started)"
        " SELECT image_id, '', node_id, started FROM origin_fills"
    )
    op.drop_table("origin_fills")
    op.rename_table("origin_fills_by_site", "origin_fills")


def downgrade() -> None:
    op.create_table(
        "origin_fills_one",
        sa.Column("image_id", sa.String(255), primary_key=True),
        sa.Column(
            "node_id", sa.Integer, sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    )
    # One claim per image again: the oldest of each image's per-site claims.
    op.execute(
        "INSERT INTO origin_fills_one (image_id, node_id, started)"
        " SELECT image_id, node_id, started FROM origin_fills AS f WHERE NOT EXISTS"
        " (SELECT 1 FROM origin_fills AS g WHERE g.image_id = f.image_id"
        " AND (g.started < f.started OR (g.started = f.started AND g.site < f.site)))"
    )
    op.drop_table("origin_fills")
    op.rename_table("origin_fills_one", "origin_fills")
    op.drop_column("nodes", "site")
