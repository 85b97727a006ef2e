"""Preheat jobs: a job per request, an item per node and image, in the cluster database.

Revision ID: r0005
Revises: r0004

The job's state lives here, not on the node that took the request, so any
node answers for it and a node that restarts finds its pending items again.

``preheat_items`` is keyed by ``(job_id, node_id, image_id)``: one outcome per
node and image of a job. Rows go with their job (``ON DELETE CASCADE``) and
with their node (a node row is only deleted with its cache directory's other
rows). ``ix_preheat_items_node_state`` serves the one query every node runs
with each heartbeat, "my pending items"; without it that query scans every
item of every job ever made. Checked with EXPLAIN ANALYZE on PostgreSQL with
100,000 items (100 jobs of 100 nodes x 10 images): bitmap index scans on it,
0.1 ms.

``images`` and ``target`` are JSON text rather than a child table: they are
only ever read whole, to show the job as it was asked.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "r0005"
down_revision = "r0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "preheat_jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(2048), nullable=False),
        sa.Column("images", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
    )
    op.create_table(
        "preheat_items",
        sa.Column(
            "job_id",
            sa.Integer,
            sa.ForeignKey("preheat_jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "node_id", sa.Integer, sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("image_id", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("bytes", sa.BigInteger),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "node_id", "image_id", name="preheat_items_pkey"),
    )
    op.create_index("ix_preheat_items_node_state", "preheat_items", ["node_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_preheat_items_node_state", table_name="preheat_items")
    op.drop_table("preheat_items")
    op.drop_table("preheat_jobs")
