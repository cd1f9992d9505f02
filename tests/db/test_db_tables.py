"""The tables and the session helper on both backends: round trips, constraints, rollback, errors,
and `lock_search` serialising read-modify-write across threads."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import optuna
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import OperationalError

from caviar.db.migrate import is_current
from caviar.db.session import (
    ConstraintViolation,
    DatabaseError,
    get_engine,
    lock_search,
    session_scope,
)
from caviar.db.storage import optuna_storage
from caviar.db.tables import ApiKey, Search, StoredDataset, StoredModel, utcnow

BLOB = bytes(range(256)) * 40


def add_search(url: str, search_id: str = "s1", **fields) -> None:
    fields = {"owner": "alice", "name": "tiny", "spec": {"budget": {"trials": 8}}} | fields
    with session_scope(url) as session:
        session.add(Search(id=search_id, **fields))


def test_search_round_trip(migrated_url):
    add_search(migrated_url, idempotency_key="k1", request_sha256="0" * 64)
    with session_scope(migrated_url) as session:
        search = session.get_one(Search, "s1")
        assert (search.status, search.stage, search.studies, search.best) == ("queued", 0, [], None)
        assert search.spec == {"budget": {"trials": 8}}
        assert not search.cancel_requested
        assert search.error is search.started_at is search.finished_at is None
        assert search.created_at.tzinfo is UTC
        assert abs(search.created_at - utcnow()) < timedelta(minutes=1)
        first_update = search.updated_at
        search.status, search.stage, search.started_at = "running", 1, utcnow()
        search.studies.append("caviar/alice/s1/1")  # in-place changes are tracked
        search.best = {"trial": 3, "dev_accuracy": 0.5}
    with session_scope(migrated_url) as session:
        search = session.get_one(Search, "s1")
        assert search.best is not None
        search.best["dev_accuracy"] = 0.75
    with session_scope(migrated_url) as session:
        search = session.get_one(Search, "s1")
        assert (search.status, search.stage, search.studies) == (
            "running",
            1,
            ["caviar/alice/s1/1"],
        )
        assert search.best == {"trial": 3, "dev_accuracy": 0.75}
        assert search.started_at is not None and search.started_at.tzinfo is UTC
        assert search.updated_at > first_update
        assert session.scalars(select(Search.id).where(Search.owner == "alice")).all() == ["s1"]
        session.delete(search)
    with session_scope(migrated_url) as session:
        assert session.get(Search, "s1") is None


def test_dataset_round_trip_loads_content_only_on_demand(migrated_url):
    with session_scope(migrated_url) as session:
        session.add(
            StoredDataset(
                id="d1",
                owner="alice",
                name="iris.csv",
                format="csv",
                target="species",
                rows=150,
                columns=5,
                size=len(BLOB),
                sha256=hashlib.sha256(BLOB).hexdigest(),
                content=BLOB,
            )
        )
    with session_scope(migrated_url) as session:
        dataset = session.scalars(select(StoredDataset).where(StoredDataset.owner == "alice")).one()
        assert (dataset.format, dataset.target, dataset.rows, dataset.columns) == (
            "csv",
            "species",
            150,
            5,
        )
        assert "content" in inspect(dataset).unloaded
        assert dataset.content == BLOB
        assert hashlib.sha256(dataset.content).hexdigest() == dataset.sha256
        session.delete(dataset)
    with session_scope(migrated_url) as session:
        assert session.get(StoredDataset, "d1") is None


def test_api_key_round_trip(migrated_url):
    with session_scope(migrated_url) as session:
        session.add(ApiKey(id="k" * 24, owner="alice", name="laptop", salt="s", hash="h" * 64))
    with session_scope(migrated_url) as session:
        key = session.get_one(ApiKey, "k" * 24)
        assert (key.owner, key.name, key.salt) == ("alice", "laptop", "s")
        assert key.last_used_at is key.revoked_at is None
        key.revoked_at = utcnow()
    with session_scope(migrated_url) as session:
        revoked_at = session.get_one(ApiKey, "k" * 24).revoked_at
        assert revoked_at is not None and revoked_at.tzinfo is UTC


def test_trained_model_round_trip_and_cascade_delete(migrated_url):
    add_search(migrated_url)
    with session_scope(migrated_url) as session:
        session.add(StoredModel(search_id="s1", content=BLOB, size=len(BLOB), sha256="a" * 64))
    with session_scope(migrated_url) as session:
        model = session.get_one(StoredModel, "s1")
        assert "content" in inspect(model).unloaded
        assert (model.content, model.size) == (BLOB, len(BLOB))
    with session_scope(migrated_url) as session:
        session.delete(session.get_one(Search, "s1"))
    with session_scope(migrated_url) as session:
        assert session.scalars(select(StoredModel)).all() == []


def test_model_of_a_missing_search_is_a_conflict(migrated_url):
    with pytest.raises(ConstraintViolation), session_scope(migrated_url) as session:
        session.add(StoredModel(search_id="nope", content=b"", size=0, sha256="a" * 64))


def test_idempotency_key_is_unique_per_owner(migrated_url):
    add_search(migrated_url, "s1", idempotency_key="k")
    add_search(migrated_url, "s2", owner="bob", idempotency_key="k")
    add_search(migrated_url, "s3")  # keys left out never clash
    add_search(migrated_url, "s4")
    with pytest.raises(ConstraintViolation, match="idempotency_key"):
        add_search(migrated_url, "s5", idempotency_key="k")
    with session_scope(migrated_url) as session:
        assert session.scalars(select(Search.id).order_by(Search.id)).all() == [
            "s1",
            "s2",
            "s3",
            "s4",
        ]


def test_unknown_status_and_format_are_refused(migrated_url):
    with pytest.raises(ConstraintViolation):
        add_search(migrated_url, status="paused")
    with pytest.raises(ConstraintViolation), session_scope(migrated_url) as session:
        session.add(
            StoredDataset(
                id="d",
                owner="a",
                name="x",
                format="xlsx",
                rows=1,
                columns=1,
                size=0,
                sha256="0" * 64,
                content=b"",
            )
        )


def test_naive_datetimes_are_refused(migrated_url):
    with pytest.raises(DatabaseError, match="naive datetime"):
        add_search(migrated_url, started_at=datetime(2025, 1, 1))


def test_session_scope_rolls_back_when_the_block_raises(migrated_url):
    add_search(migrated_url)
    with pytest.raises(ValueError, match="boom"), session_scope(migrated_url) as session:
        session.get_one(Search, "s1").status = "failed"
        session.add(Search(id="s2", owner="alice", name="other", spec={}))
        session.flush()
        raise ValueError("boom")
    with session_scope(migrated_url) as session:
        assert session.scalars(select(Search.id)).all() == ["s1"]
        assert session.get_one(Search, "s1").status == "queued"


@pytest.mark.parametrize(
    "url",
    ["postgresql://postgres@127.0.0.1:1/caviar_test", "sqlite:////nonexistent/dir/caviar.db"],
    ids=["postgresql", "sqlite"],
)
def test_unreachable_database_raises_a_readable_database_error(url):
    with pytest.raises(DatabaseError) as raised, session_scope(url) as session:
        session.execute(text("SELECT 1"))
    message = str(raised.value)
    assert isinstance(raised.value.__cause__, OperationalError)
    assert "\n" not in message and "Traceback" not in message
    assert ("port 1" in message) if url.startswith("postgresql") else ("unable to open" in message)
    with pytest.raises(DatabaseError):
        is_current(url)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://someone:topsecret@127.0.0.1:1/caviar_test",
        "postgresql://someone@127.0.0.1:1/caviar_test?password=topsecret&connect_timeout=2",
    ],
    ids=["in the user part", "in the query string"],
)
def test_a_database_error_never_shows_the_password(url):
    with pytest.raises(DatabaseError) as raised, session_scope(url) as session:
        session.execute(text("SELECT 1"))
    assert "topsecret" not in str(raised.value) and "someone" in str(raised.value)


def test_engines_are_cached_per_normalised_url(database_url):
    assert get_engine(database_url) is get_engine(database_url)
    if database_url.startswith("postgresql+psycopg://"):
        plain = database_url.replace("postgresql+psycopg://", "postgresql://")
        assert get_engine(plain) is get_engine(database_url)


def test_sqlite_connections_use_wal_a_busy_timeout_and_foreign_keys(tmp_path):
    with get_engine(f"sqlite:///{tmp_path / 'caviar.db'}").connect() as connection:
        pragmas = [
            connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "busy_timeout", "foreign_keys")
        ]
    assert pragmas == ["wal", 30000, 1]


def test_lock_search_of_a_missing_search_is_none(migrated_url):
    with session_scope(migrated_url) as session:
        assert lock_search(session, "nope") is None


def test_optuna_can_write_while_a_search_is_locked(migrated_url):
    """Workers ask Optuna for trials, on Optuna's own connection, while they hold the search."""
    add_search(migrated_url)
    with session_scope(migrated_url) as session:
        search = lock_search(session, "s1")
        assert search is not None
        search.stage = 1
        study = optuna.create_study(
            study_name="caviar/alice/s1/1", storage=optuna_storage(migrated_url)
        )
        study.tell(study.ask(), 0.5)
    assert len(study.trials) == 1


def test_lock_search_serialises_read_modify_write(migrated_url):
    """Each worker reads `stage`, dawdles, and writes it back plus one: no increment is lost."""
    if migrated_url.startswith("sqlite"):
        pytest.skip("SQLite serves one worker process; lock_search there takes no lock")
    add_search(migrated_url)
    workers, rounds = 3, 4
    start = threading.Barrier(workers)

    def bump() -> None:
        start.wait()
        for _ in range(rounds):
            with session_scope(migrated_url) as session:
                search = lock_search(session, "s1")
                assert search is not None
                stage = search.stage
                time.sleep(0.02)
                search.stage = stage + 1

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(bump) for _ in range(workers)]:
            future.result()
    with session_scope(migrated_url) as session:
        assert session.get_one(Search, "s1").stage == workers * rounds
