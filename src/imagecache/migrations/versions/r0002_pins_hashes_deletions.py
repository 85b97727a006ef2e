"""Pinning, multihash and cluster-wide deletion.

Revision ID: r0002
Revises: r0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0002"
down_revision = "r0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cached_images", sa.Column("hash_algo", sa.String(16), nullable=True))
    op.add_column("cached_images", sa.Column("hash_value", sa.String(128), nullable=True))
    op.add_column(
        "cached_images",
        sa.Column("pinned", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    # Eviction walks unpinned entries of one node, oldest access first.
    op.drop_index("ix_cached_images_lru", table_name="cached_images")
    op.create_index("ix_cached_images_lru", "cached_images", ["node_id", "pinned", "last_accessed"])
    # Who holds an image is asked by image id across every node.
    op.create_index("ix_cached_images_image", "cached_images", ["image_id"])
    op.create_table(
        "deleted_images",
        sa.Column("image_id", sa.String(255), primary_key=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deleted_images")
    op.drop_index("ix_cached_images_image", table_name="cached_images")
    op.drop_index("ix_cached_images_lru", table_name="cached_images")
    op.create_index("ix_cached_images_lru", "cached_images", ["node_id", "last_accessed"])
    op.drop_column("cached_images", "pinned")
    op.drop_column("cached_images", "hash_value")
    op.drop_column("cached_images", "hash_algo")
