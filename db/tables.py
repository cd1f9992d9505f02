"""Caviar's tables (all prefixed `caviar_`), next to Optuna's in the same database.

JSON columns track in-place changes one level deep (`search.best["value"] = x` is saved);
deeper changes need a new value assigned. Datetimes are timezone-aware UTC on every backend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class SearchStatus(StrEnum):
    """Where a search stands; the members compare equal to the strings stored in the table."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


SEARCH_STATUSES = tuple(status.value for status in SearchStatus)
OPEN_STATUSES = frozenset({SearchStatus.QUEUED, SearchStatus.RUNNING})
"""A worker may still work on such a search."""
TERMINAL_STATUSES = frozenset(SearchStatus) - OPEN_STATUSES
DATASET_FORMATS = ("npz", "csv")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that reads back aware UTC everywhere (SQLite keeps no zone).

    Naive datetimes are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use an aware one, e.g. utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json() -> JSON:
    return JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    """Declarative base of Caviar's tables; constraint names follow `NAMING_CONVENTION`."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


def _created_at() -> Mapped[datetime]:
    return mapped_column(default=utcnow, server_default=func.now())


class Search(Base):
    """One hyperparameter search: its spec, where it stands, and its best trial so far.

    `stage` is 0 until the first stage starts; `studies` lists its Optuna study names in stage
    order. Workers change a running search only under `db.session.lock_search`.
    """

    __tablename__ = "caviar_searches"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        CheckConstraint(f"status IN {SEARCH_STATUSES}", name="status"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(MutableDict.as_mutable(_json()))
    status: Mapped[str] = mapped_column(String(16), index=True, default=SearchStatus.QUEUED.value)
    stage: Mapped[int] = mapped_column(default=0)
    studies: Mapped[list[str]] = mapped_column(MutableList.as_mutable(_json()), default=list)
    best: Mapped[dict[str, Any] | None] = mapped_column(MutableDict.as_mutable(_json()))
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    #: Workers that died or failed while working on the search; at a limit, it fails.
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.now()
    )
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Lease(Base):
    """A worker working on a search (`phase`: load its data, train its trials, finish it), alive
    while it writes heartbeats; a stale lease is a worker that died there."""

    __tablename__ = "caviar_leases"

    search_id: Mapped[str] = mapped_column(
        ForeignKey("caviar_searches.id", ondelete="CASCADE"), primary_key=True
    )
    worker: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    phase: Mapped[str] = mapped_column(String(16))
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class StoredDataset(Base):
    """An uploaded data set: an `.npz` archive, or a CSV file whose `target` column is the label."""

    __tablename__ = "caviar_datasets"
    __table_args__ = (CheckConstraint(f"format IN {DATASET_FORMATS}", name="format"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str] = mapped_column(String(8))
    target: Mapped[str | None] = mapped_column(String(200))
    rows: Mapped[int]
    columns: Mapped[int]
    #: Outputs of the task its labels imply (classes, or 1 for regression), and its distinct
    #: labels where a spec may ask for classification (integers, strings); None for uploads
    #: made before Caviar kept them.
    outputs: Mapped[int | None]
    classes: Mapped[int | None]
    #: What its labels are (`text`, `integer`, `real`: which tasks they allow); None for uploads
    #: made before Caviar kept it.
    labels: Mapped[str | None] = mapped_column(String(8))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[datetime] = _created_at()


class ApiKey(Base):
    """An API key: its public id and a salted SHA-256 of its secret, never the secret itself."""

    __tablename__ = "caviar_api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(200))
    salt: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class StoredModel(Base):
    """The checkpoint of a search's best trial; deleted with its search."""

    __tablename__ = "caviar_models"

    search_id: Mapped[str] = mapped_column(
        ForeignKey("caviar_searches.id", ondelete="CASCADE"), primary_key=True
    )
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created_at()
