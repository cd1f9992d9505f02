"""Worker attempts per search and the leases of workers working on a search.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("caviar_searches") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "caviar_leases",
        sa.Column("search_id", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["search_id"],
            ["caviar_searches.id"],
            name=op.f("fk_caviar_leases_search_id_caviar_searches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("search_id", "worker", name=op.f("pk_caviar_leases")),
    )
    op.create_index(op.f("ix_caviar_leases_worker"), "caviar_leases", ["worker"])


def downgrade() -> None:
    op.drop_table("caviar_leases")
    with op.batch_alter_table("caviar_searches") as batch:
        batch.drop_column("attempts")
