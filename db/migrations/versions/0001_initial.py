"""Caviar's first tables: searches, data sets, API keys, trained models.

Revision ID: 0001
Revises:
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIME = sa.DateTime(timezone=True)


def _created_at() -> sa.Column:
    return sa.Column("created_at", TIME, server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "caviar_searches",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("studies", JSON, nullable=False),
        sa.Column("best", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_sha256", sa.String(64), nullable=True),
        _created_at(),
        sa.Column("updated_at", TIME, server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("finished_at", TIME, nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_caviar_searches_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_caviar_searches")),
        sa.UniqueConstraint(
            "owner", "idempotency_key", name=op.f("uq_caviar_searches_owner_idempotency_key")
        ),
    )
    op.create_index(op.f("ix_caviar_searches_owner"), "caviar_searches", ["owner"])
    op.create_index(op.f("ix_caviar_searches_status"), "caviar_searches", ["status"])

    op.create_table(
        "caviar_datasets",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("target", sa.String(200), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=False),
        sa.Column("columns", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        _created_at(),
        sa.CheckConstraint("format IN ('npz', 'csv')", name=op.f("ck_caviar_datasets_format")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_caviar_datasets")),
    )
    op.create_index(op.f("ix_caviar_datasets_owner"), "caviar_datasets", ["owner"])

    op.create_table(
        "caviar_api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        _created_at(),
        sa.Column("last_used_at", TIME, nullable=True),
        sa.Column("revoked_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_caviar_api_keys")),
    )
    op.create_index(op.f("ix_caviar_api_keys_owner"), "caviar_api_keys", ["owner"])

    op.create_table(
        "caviar_models",
        sa.Column("search_id", sa.String(64), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["search_id"],
            ["caviar_searches.id"],
            name=op.f("fk_caviar_models_search_id_caviar_searches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("search_id", name=op.f("pk_caviar_models")),
    )


def downgrade() -> None:
    op.drop_table("caviar_models")
    op.drop_table("caviar_api_keys")
    op.drop_table("caviar_datasets")
    op.drop_table("caviar_searches")
