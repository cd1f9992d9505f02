"""An API on a real SQLite file with two owners, alice and bob, each holding a key."""

import pytest
from fastapi.testclient import TestClient

from caviar.db.keys import create_key
from caviar.db.migrate import upgrade
from caviar.db.session import session_scope
from caviar.service.app import create_app
from caviar.service.settings import Settings


@pytest.fixture
def settings(tmp_path):
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    return Settings(database_url=url, max_concurrent_searches=3)


@pytest.fixture
def tokens(settings):
    with session_scope(settings.database_url) as session:
        return {owner: create_key(session, owner, "test")[1] for owner in ("alice", "bob")}


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client
