"""Fixtures shared by every test package: `database_url` runs a test on a fresh SQLite file and
on the PostgreSQL test database (wiped first).

The suite sets up what it needs itself (see `external`): the PostgreSQL test database is created
when missing, and a throw-away server is started from the installed binaries when none answers.
Where PostgreSQL or Chromium cannot be had, the tests that need them fail under `CI=true` and are
skipped, with the reason in the run's header, elsewhere.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from caviar.db.migrate import upgrade
from caviar.db.session import get_engine
from caviar.db.storage import optuna_storage

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests import external
else:
    import external

# Exact float32 matmuls in the tests and in every process they start, as workers and `caviar run`
# use by default (CAVIAR_MATMUL_PRECISION), so tolerances hold on GPU hosts too.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def pytest_configure(config: pytest.Config) -> None:
    """Find (or start) PostgreSQL once; subprocesses see the URL as CAVIAR_TEST_POSTGRES_URL."""
    external.configure_postgres()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say once what the run uses, and what it lacks."""
    return external.report()


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
    url = external.postgres_test_url()
    reset_postgres(url)
    return url


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """`database_url` with Caviar's tables at the head revision."""
    upgrade(database_url)
    return database_url


@pytest.fixture
def postgres_url() -> str:
    """The PostgreSQL test database, wiped (for tests of the production store only)."""
    url = external.postgres_test_url()
    reset_postgres(url)
    return url
