"""Fixtures of the fault tests: an upgraded PostgreSQL database, and workers that reap fast."""

import os

import pytest

from caviar.db.migrate import upgrade

#: Seconds after which a worker that wrote no heartbeat (1 s apart) counts as dead.
GRACE_S = 4


@pytest.fixture
def url(postgres_url):
    """The PostgreSQL test database, wiped and at the head revision."""
    upgrade(postgres_url)
    return postgres_url


@pytest.fixture
def grace_s() -> int:
    """The grace period the `env` fixture gives workers."""
    return GRACE_S


@pytest.fixture
def env(url):
    """The environment of a worker on `url` with 1 s heartbeats and a GRACE_S grace period."""
    return {
        **os.environ,
        "CAVIAR_DATABASE_URL": url,
        "CAVIAR_HEARTBEAT_S": "1",
        "CAVIAR_GRACE_S": str(GRACE_S),
    }
