"""Alembic migrations of Caviar's tables, run from code (no alembic.ini), and Optuna's schema.

Optuna keeps its own tables and its own `alembic_version` table in the same database; ours are
the `caviar_` tables, versioned in `caviar_alembic_version`, and our migrations never touch the
rest. `upgrade` also creates (or migrates) Optuna's schema, so workers and the API run no DDL.
To write the next revision, change `db.tables`, then autogenerate against a database at head:

    from alembic import command
    from caviar.db.migrate import alembic_config
    from caviar.db.session import get_engine
    with get_engine(url).begin() as connection:
        command.revision(alembic_config(connection), "what changed", autogenerate=True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text

from caviar.db.session import DatabaseError, database_errors, get_engine
from caviar.db.storage import engine_options, normalise_url, optuna_schema_is_current
from caviar.db.tables import Base

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
        return _revision(connection)


def _revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def is_current(url: str) -> bool:
    """Whether `url` has our tables at `head_revision()` and Optuna's at the installed Optuna's
    schema; raises `DatabaseError` if it cannot be reached."""
    with database_errors(url), get_engine(url).connect() as connection:
        return _revision(connection) == head_revision() and optuna_schema_is_current(connection)


class NotUpgraded(DatabaseError):
    """The database lacks tables, or has older ones, than this code needs."""


def require_current(url: str) -> None:
    """Raise `NotUpgraded`, saying to run `caviar db upgrade`, unless `url` is current."""
    if not is_current(url):
        raise NotUpgraded(
            "the database's tables are missing or out of date: run `caviar db upgrade`"
        )


def upgrade(url: str) -> None:
    """Bring every table at `url`, Optuna's and ours, to the head revision (a no-op when there).

    On PostgreSQL concurrent upgrades wait for each other on an advisory lock.
    """
    with database_errors(url), get_engine(url).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
        _upgrade_optuna(url)
        command.upgrade(alembic_config(connection), "head")


def _upgrade_optuna(url: str) -> None:
    """Create Optuna's tables and stamp their revision, or migrate an older Optuna schema."""
    url = normalise_url(url)
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs=engine_options(url), skip_compatibility_check=True
    )
    try:
        if storage.get_current_version() != storage.get_head_version():
            storage.upgrade()
    finally:
        storage.engine.dispose()
