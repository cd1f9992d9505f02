"""Poison searches fail alone: real `caviar worker` processes on the PostgreSQL test database.

A search whose data takes minutes to generate stands in for any search that hangs or kills its
workers; 1 s heartbeats, a 4 s grace period and at most 2 failed attempts per search.
"""

import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import select

from caviar.db.session import session_scope
from caviar.db.tables import Lease, Search
from caviar.search.spec import parse_spec
from caviar.service.searches import submit_search

SLOW = """
name: slow
dataset: {name: mnist1d, samples: 500000}
budget: {trials: 2, epochs: 2}
space: {learning_rate: {low: 1.0e-3, high: 0.1, scale: log}}
fixed: {optimizer: adam, batch_size: 32, hidden_units: 8, hidden_layers: 1}
"""
QUICK = SLOW.replace("{name: mnist1d, samples: 500000}", "{name: synthetic, samples: 300}")


@pytest.fixture
def env(env):
    """The fault tests' worker environment, with at most 2 failed attempts per search."""
    return {**env, "CAVIAR_MAX_SEARCH_ATTEMPTS": "2"}


def queue(url, text: str, owner: str) -> str:
    with session_scope(url) as session:
        search, _ = submit_search(
            session, owner, parse_spec(text), idempotency_key=None, max_concurrent=10
        )
        return search.id


def start_worker(env):
    return subprocess.Popen(
        [sys.executable, "-m", "caviar.service.cli", "worker", "--idle-sleep", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def loaders(url, search_id) -> set[str]:
    """The workers holding a lease to load the search (dead ones until their lease is reaped)."""
    with session_scope(url) as session:
        query = select(Lease.worker).where(Lease.search_id == search_id, Lease.phase == "load")
        return set(session.scalars(query))


def search(url, search_id) -> Search:
    with session_scope(url) as session:
        return session.get_one(Search, search_id)


def stop(process):
    if process.poll() is None:
        process.kill()
    return process.communicate(timeout=30)[0]


def test_sigterm_stops_a_worker_within_10_seconds_while_it_generates_data(url, env):
    search_id = queue(url, SLOW, "alice")
    worker = start_worker(env)
    try:
        wait_until(lambda: loaders(url, search_id), 90, "the worker to load the data")
        time.sleep(1)  # well inside the generation, which takes minutes
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        output = worker.communicate(timeout=10)[0]
        assert time.monotonic() - started < 10
        assert worker.returncode == 0, output
    finally:
        stop(worker)
    # A worker stopped on purpose gave its lease back: it is not a failed attempt.
    assert not loaders(url, search_id)
    assert search(url, search_id).attempts == 0


def test_a_search_that_kills_its_workers_fails_and_another_owners_search_completes(
    url: str, env: dict[str, str], grace_s: int
) -> None:
    poison = queue(url, SLOW, "alice")
    dead: set[str] = set()
    for _ in range(2):  # each worker that takes the poison search up dies on it
        worker = start_worker(env)

        def a_new_loader(seen: frozenset[str] = frozenset(dead)) -> bool:
            return bool(loaders(url, poison) - seen)

        try:
            wait_until(a_new_loader, 90, "a new worker to load the poison search")
            dead |= loaders(url, poison)
            worker.send_signal(signal.SIGKILL)
        finally:
            stop(worker)
        time.sleep(grace_s + 1)  # the dead worker's lease is stale from now on
    healthy = queue(url, QUICK, "bob")
    worker = start_worker(env)
    try:
        wait_until(lambda: search(url, healthy).status == "completed", 120, "bob's search")
    finally:
        output = stop(worker)
    failed = search(url, poison)
    assert failed.status == "failed", output
    assert (
        failed.error
        == "2 worker attempts failed; the last: a worker died while loading its dataset"
    )


def test_a_slow_load_holds_up_no_other_search_and_a_cancel_ends_it(url, env):
    slow = queue(url, SLOW, "carol")
    workers = [start_worker(env), start_worker(env)]
    try:
        wait_until(lambda: loaders(url, slow), 90, "a worker to load carol's data")
        quick = queue(url, QUICK, "bob")
        # The other worker leaves carol's search to the one loading it and serves bob's.
        wait_until(lambda: search(url, quick).status == "completed", 180, "bob's search")
        assert len(loaders(url, slow)) == 1
        with session_scope(url) as session:
            session.get_one(Search, slow).cancel_requested = True
        # The loader gives the cancelled search up within seconds, not after the generation.
        wait_until(lambda: not loaders(url, slow), 15, "the load of carol's search to stop")
        assert all(worker.poll() is None for worker in workers)
    finally:
        for worker in workers:
            stop(worker)
