"""The first central schema: nodes and what each caches.

Revision ID: r0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("url", sa.String(2048), nullable=False, unique=True),
        sa.Column("instance_id", sa.String(64), nullable=False),
        sa.Column("heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "cached_images",
        sa.Column("image_id", sa.String(255), primary_key=True),
        sa.Column(
            "node_id",
            sa.Integer,
            sa.ForeignKey("nodes.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("size", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("hits", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_accessed", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_modified", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checksum", sa.String(32), nullable=True),
    )
    op.create_index("ix_cached_images_lru", "cached_images", ["node_id", "last_accessed"])


def downgrade() -> None:
    op.drop_index("ix_cached_images_lru", table_name="cached_images")
    op.drop_table("cached_images")
    op.drop_table("nodes")
