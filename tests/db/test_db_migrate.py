"""Migrations on both backends: exactly our tables, idempotent, beside Optuna's, no drift."""

from __future__ import annotations

import optuna
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, text

from caviar.db.migrate import (
    VERSION_TABLE,
    NotUpgraded,
    context_options,
    current_revision,
    head_revision,
    is_current,
    require_current,
    upgrade,
)
from caviar.db.session import get_engine
from caviar.db.storage import optuna_head_revision, optuna_storage
from caviar.db.tables import Base

CAVIAR_TABLES = {
    "caviar_searches",
    "caviar_datasets",
    "caviar_api_keys",
    "caviar_models",
    "caviar_leases",
}


def table_names(url: str) -> set[str]:
    return set(inspect(get_engine(url)).get_table_names())


def drift(url: str, metadata: MetaData = Base.metadata) -> list:
    with get_engine(url).connect() as connection:
        return compare_metadata(
            MigrationContext.configure(connection, opts=context_options()), metadata
        )


def test_models_define_exactly_the_caviar_tables():
    assert set(Base.metadata.tables) == CAVIAR_TABLES


def test_upgrade_creates_our_tables_and_optunas_with_their_version_tables(database_url):
    assert current_revision(database_url) is None
    assert not is_current(database_url)
    upgrade(database_url)
    optuna_tables = set(optuna.storages._rdb.models.BaseModel.metadata.tables)
    expected = CAVIAR_TABLES | {VERSION_TABLE} | optuna_tables | {"alembic_version"}
    assert table_names(database_url) == expected
    assert current_revision(database_url) == head_revision()
    with get_engine(database_url).connect() as connection:
        optuna_version = connection.execute(text("SELECT version_num FROM alembic_version"))
        assert optuna_version.scalar_one() == optuna_head_revision()
    assert is_current(database_url)


def test_caviar_tables_without_optunas_are_not_current(database_url):
    upgrade(database_url)
    with get_engine(database_url).begin() as connection:
        connection.execute(text("DROP TABLE alembic_version"))
    assert current_revision(database_url) == head_revision()
    assert not is_current(database_url)
    with pytest.raises(NotUpgraded, match="run `caviar db upgrade`"):
        require_current(database_url)


def test_upgrade_twice_is_a_no_op(database_url):
    upgrade(database_url)
    with get_engine(database_url).connect() as connection:
        versions = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    upgrade(database_url)
    with get_engine(database_url).connect() as connection:
        again = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    assert versions == again == [(head_revision(),)]


def test_models_and_migrations_do_not_drift(migrated_url):
    assert drift(migrated_url) == []


@pytest.mark.parametrize("optuna_first", [True, False], ids=["optuna-first", "caviar-first"])
def test_upgrade_beside_optuna_tables(database_url, optuna_first):
    if optuna_first:
        study = optuna.create_study(study_name="before", storage=optuna_storage(database_url))
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    upgrade(database_url)
    optuna_storage.cache_clear()  # a new process: Optuna checks its schema again
    study = optuna.create_study(
        study_name="before", storage=optuna_storage(database_url), load_if_exists=True
    )
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(study.trials) == (3 if optuna_first else 1)

    tables = table_names(database_url)
    assert CAVIAR_TABLES | {VERSION_TABLE, "alembic_version", "studies", "trials"} <= tables
    with get_engine(database_url).connect() as connection:
        optuna_version = connection.execute(text("SELECT version_num FROM alembic_version"))
        assert optuna_version.scalar_one() != head_revision()
    assert is_current(database_url)
    assert drift(database_url) == []
    # Autogenerate would drop only our tables, never Optuna's, were the models empty.
    removed = {op[1].name for op in drift(database_url, MetaData()) if op[0] == "remove_table"}
    assert removed == CAVIAR_TABLES
