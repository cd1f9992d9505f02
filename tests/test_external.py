"""The suite's own set-up: the PostgreSQL database and server it makes where they are missing."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests import external
else:
    import external


def _select_one(url: str) -> int:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return connection.scalar(text("SELECT 1"))
    finally:
        engine.dispose()


def _drop(url: str) -> None:
    target = make_url(url)
    admin = create_engine(target.set(database="postgres"), poolclass=NullPool)
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{target.database}" WITH (FORCE)'))
    admin.dispose()


def test_a_missing_test_database_is_created_on_the_running_server() -> None:
    server_url = make_url(external.postgres_test_url())
    wanted = server_url.set(database=f"caviar_setup_{uuid.uuid4().hex[:8]}")
    wanted_url = wanted.render_as_string(hide_password=False)
    with pytest.raises(OperationalError, match="does not exist"):
        _select_one(wanted_url)
    try:
        url, server = external.ensure_postgres(wanted_url)
        assert server is None  # the server that answers is used, none is started
        assert url == wanted_url and _select_one(url) == 1
        assert external.create_database(wanted) is False  # there now: not created twice
    finally:
        _drop(wanted_url)


def test_a_temporary_server_is_started_where_none_answers() -> None:
    if external._postgres_bindir() is None:
        external.missing(f"PostgreSQL binaries: not found; {external.POSTGRES_HINT}")
    nobody = f"postgresql+psycopg://postgres@127.0.0.1:{external._free_port()}/caviar_test"
    url, server = external.ensure_postgres(nobody)
    assert server is not None
    try:
        assert make_url(url).port == server.port and _select_one(url) == 1
    finally:
        server.stop()
    assert not server.data_dir.exists()
    with pytest.raises(OperationalError):
        _select_one(url)


def test_a_missing_tool_fails_under_ci_and_skips_elsewhere(monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no chromium"):
        external.missing("no chromium")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        external.missing("no chromium")
