"""The outputs of an uploaded dataset for its inferred task, and its classes where its labels
can be classes, so that the API can count a search's parameters before accepting it.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("caviar_datasets") as batch:
        batch.add_column(sa.Column("outputs", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("classes", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("caviar_datasets") as batch:
        batch.drop_column("classes")
        batch.drop_column("outputs")
