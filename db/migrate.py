"""Alembic migrations of Caviar's tables, run from code (no alembic.ini).

Optuna keeps its own tables and its own `alembic_version` table in the same database; ours are
the `caviar_` tables, versioned in `caviar_alembic_version`, and migrations never touch the rest.
To write the next revision, change `db.models`, then autogenerate against a database at head:

    from alembic import command
    from db.migrate import alembic_config
    from db.session import get_engine
    with get_engine(url).begin() as connection:
        command.revision(alembic_config(connection), "what changed", autogenerate=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from db.models import Base
from db.session import database_errors, get_engine

VERSION_TABLE = "caviar_alembic_version"
TABLE_PREFIX = "caviar_"
# Any fixed 64-bit number: PostgreSQL serialises concurrent upgrades on this advisory lock.
_UPGRADE_LOCK = 0x63617669617200


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Let migrations and autogenerate see only Caviar's tables, never Optuna's."""
    return type_ != "table" or (name or "").startswith(TABLE_PREFIX)


def context_options() -> dict[str, Any]:
    """Options of every migration context, shared by `env.py` and the drift test."""
    return {
        "target_metadata": Base.metadata,
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "compare_type": True,
        "compare_server_default": True,
        "render_as_batch": True,
    }


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config of our migrations; `env.py` runs them on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "db/migrations/versions holds no revision"
    return head


def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None before the first upgrade."""
    with database_errors(url), get_engine(url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def is_current(url: str) -> bool:
    """Whether `url` is at `head_revision()`; raises `DatabaseError` if it cannot be reached."""
    return current_revision(url) == head_revision()


def upgrade(url: str) -> None:
    """Bring Caviar's tables at `url` to the head revision; does nothing when already there."""
    with database_errors(url), get_engine(url).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        command.upgrade(alembic_config(connection), "head")
