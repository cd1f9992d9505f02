"""What an uploaded dataset's labels are (text, integer, real), so that the API can refuse a
search whose task they do not allow (regression on strings, classification on fractions) before
accepting it.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("caviar_datasets") as batch:
        batch.add_column(sa.Column("labels", sa.String(8), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("caviar_datasets") as batch:
        batch.drop_column("labels")
