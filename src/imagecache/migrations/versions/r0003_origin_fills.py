"""Which node is reading an image from the origin right now, so siblings follow it.

Revision ID: r0003
Revises: r0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0003"
down_revision = "r0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "origin_fills",
        sa.Column("image_id", sa.String(255), primary_key=True),
        sa.Column(
            "node_id", sa.Integer, sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("origin_fills")
