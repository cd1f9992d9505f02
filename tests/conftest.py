"""Fixtures shared by every test package: `database_url` runs a test on a fresh SQLite file and
on the PostgreSQL test database (wiped first). PostgreSQL must be up: CI guarantees it, so an
unreachable server fails these tests rather than skipping them.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from db.migrate import upgrade
from db.session import get_engine
from db.storage import optuna_storage

POSTGRES_URL = os.environ.get(
    "CAVIAR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/caviar_test"
)


def reset_postgres(url: str) -> None:
    """Drop every table of the test database, ours and Optuna's, and forget cached connections."""
    get_engine(url).dispose()
    optuna_storage.cache_clear()
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty database: a new SQLite file, or the wiped PostgreSQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'caviar.db'}"
    reset_postgres(POSTGRES_URL)
    return POSTGRES_URL


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """`database_url` with Caviar's tables at the head revision."""
    upgrade(database_url)
    return database_url


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL test database, wiped (for tests of the production store only)."""
    reset_postgres(POSTGRES_URL)
    return POSTGRES_URL
