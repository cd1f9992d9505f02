"""Workers die, are preempted and lose their connections; PostgreSQL stays the single truth.

Real `caviar worker` processes on the PostgreSQL test database, with 1 s heartbeats and a 4 s
grace period; trials are counted with Optuna's own API.
"""

import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine, text

from caviar.db.session import session_scope
from caviar.db.storage import optuna_storage
from caviar.db.tables import Search
from caviar.search.spec import parse_spec
from caviar.search.studies import FINAL_FAILURES
from caviar.service.searches import submit_search

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_service import free_port
    from tests.e2e.test_worker_metrics import scrape
else:
    from test_service import free_port
    from test_worker_metrics import scrape

TRIALS = 6
SPEC = f"""
name: faults
dataset: {{name: synthetic, samples: 2000, features: 20, classes: 3}}
budget: {{trials: {TRIALS}, epochs: 25}}
space:
  learning_rate: {{low: 1.0e-3, high: 0.1, scale: log}}
fixed: {{optimizer: adam, batch_size: 32, hidden_units: 64, hidden_layers: 2}}
"""
#: Pruned trials hand their slots to new ones: the budget stays exact through a SIGKILL.
ASHA = SPEC + "pruner: {name: asha, min_epochs: 2, reduction_factor: 2}\n"
#: A budget of trial-epochs: the search ends within one trial (25 epochs) of 80, kill or not.
TRIAL_EPOCHS = 80
ASHA_EPOCHS = ASHA.replace(f"trials: {TRIALS},", f"trial_epochs: {TRIAL_EPOCHS},")


def queue(url, spec: str = SPEC) -> str:
    with session_scope(url) as session:
        search, _ = submit_search(
            session, "alice", parse_spec(spec), idempotency_key=None, max_concurrent=10
        )
        return search.id


#: Workers started by the running test; the autouse fixture kills those left when it ends.
_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_worker_outlives_its_test():
    """A test that fails half-way leaves no worker behind to claim the next test's searches."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        process.kill()  # nothing where it has ended already
        process.wait(timeout=30)


def start_worker(env, batch=2):
    command = ["worker", "--batch", str(batch), "--idle-sleep", "0.2"]
    process = subprocess.Popen(
        [sys.executable, "-m", "caviar.service.cli", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _STARTED.append(process)
    return process


def trials(url, search_id):
    with session_scope(url) as session:
        studies = list(session.get_one(Search, search_id).studies)
    storage = optuna_storage(url)  # one pool for the test's many reads
    return [
        t for name in studies for t in optuna.load_study(study_name=name, storage=storage).trials
    ]


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def running(url, search_id) -> int:
    return sum(t.state == TrialState.RUNNING for t in trials(url, search_id))


def status(url, search_id) -> str:
    with session_scope(url) as session:
        return session.get_one(Search, search_id).status


def assert_exact_budget(url, search_id, spec: str = SPEC):
    found = trials(url, search_id)
    counted = [
        t
        for t in found
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and t.user_attrs.get("reason") in FINAL_FAILURES)
    ]
    states = [(t.number, t.state, t.user_attrs.get("reason")) for t in found]
    if spec == ASHA_EPOCHS:
        spent = sum(t.user_attrs["epochs"] for t in counted)
        assert TRIAL_EPOCHS - 25 < spent <= TRIAL_EPOCHS, (spent, states)
    else:
        assert len(counted) == TRIALS, states
    assert not [t for t in found if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return found


def stop(process):
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


def finish_with_a_new_worker(url, env, search_id) -> None:
    """A worker started now completes the search with exactly its budget."""
    worker = start_worker(env, batch=3)
    try:
        wait_until(lambda: status(url, search_id) == "completed", 180, "the search to complete")
    finally:
        stop(worker)
    assert_exact_budget(url, search_id)


@pytest.mark.parametrize(
    "spec", [SPEC, ASHA, ASHA_EPOCHS], ids=["no pruner", "asha", "asha, trial-epoch budget"]
)
def test_sigkilled_workers_trials_are_rerun_and_the_budget_is_exact(url, env, spec):
    search_id = queue(url, spec)
    first = start_worker(env)
    second = None
    try:
        wait_until(lambda: running(url, search_id) > 0, 90, "the first worker to train")
        port = free_port()
        second = start_worker({**env, "CAVIAR_WORKER_METRICS_PORT": str(port)})
        first.send_signal(signal.SIGKILL)
        wait_until(lambda: status(url, search_id) == "completed", 180, "the search to complete")
        reaped = scrape(port)["caviar_worker_reaped_trials_total"]
    finally:
        stop(first)
        if second is not None:
            stop(second)
    found = assert_exact_budget(url, search_id, spec)
    stale = [t for t in found if t.user_attrs.get("reason") == "stale"]
    assert stale, "the killed worker's trials should have been reaped"
    assert reaped == len(stale)  # by the second worker, the only one left to reap them
    retried = {t.system_attrs.get("failed_trial") for t in found} - {None}
    assert {t.number for t in stale} <= retried


def test_every_worker_killed_then_new_ones_finish_the_search(url, env):
    search_id = queue(url)
    workers = [start_worker(env), start_worker(env)]
    wait_until(lambda: running(url, search_id) >= 2, 90, "both workers to train")
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
        stop(worker)
    finish_with_a_new_worker(url, env, search_id)


def test_sigterm_preempts_within_10_seconds_and_the_trials_run_again(url, env):
    search_id = queue(url)
    worker = start_worker(env)
    wait_until(lambda: running(url, search_id) > 0, 90, "the worker to train")
    worker.send_signal(signal.SIGTERM)
    started = time.monotonic()
    output = worker.communicate(timeout=10)[0]
    assert worker.returncode == 0, output
    assert time.monotonic() - started < 10
    preempted = [t for t in trials(url, search_id) if t.user_attrs.get("reason") == "preempted"]
    assert preempted and all(t.state == TrialState.FAIL for t in preempted)
    waiting = [t for t in trials(url, search_id) if t.state == TrialState.WAITING]
    assert {t.system_attrs["failed_trial"] for t in waiting} == {t.number for t in preempted}
    assert {tuple(t.params.items()) for t in waiting} == {
        tuple(t.params.items()) for t in preempted
    }

    finish_with_a_new_worker(url, env, search_id)


def test_workers_survive_their_connections_being_terminated(url, env):
    search_id = queue(url)
    worker = start_worker(env)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        wait_until(lambda: running(url, search_id) > 0, 90, "the worker to train")

        def terminate_connections() -> bool:
            with admin.connect() as connection:
                killed = connection.execute(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalar_one()
            return killed >= 1

        for _ in range(3):  # each time the worker has connected again (its heartbeat is every 1 s)
            wait_until(terminate_connections, 30, "a connection to terminate")
            time.sleep(1.5)
        wait_until(lambda: status(url, search_id) == "completed", 180, "the search to complete")
        assert worker.poll() is None, "the worker should have kept going"
    finally:
        admin.dispose()
        stop(worker)
    assert_exact_budget(url, search_id)


def test_restarting_the_api_mid_search_loses_nothing(url, env):
    import socket

    import httpx

    from caviar.db.keys import create_key

    with session_scope(url) as session:
        token = create_key(session, "alice", "test")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}

    def serve():
        return subprocess.Popen(
            [sys.executable, "-m", "caviar.service.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def up():
        try:
            return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    api, worker = serve(), start_worker(env)
    try:
        wait_until(up, 60, "the API")
        spec = parse_spec(SPEC).model_dump(mode="json", exclude_none=True)
        search_id = httpx.post(f"{base}/v1/searches", json=spec, headers=headers).json()["id"]
        wait_until(lambda: running(url, search_id) > 0, 90, "the worker to train")
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=10)
        api = serve()
        wait_until(up, 60, "the restarted API")
        wait_until(
            lambda: (
                httpx.get(f"{base}/v1/searches/{search_id}", headers=headers).json()["status"]
                == "completed"
            ),
            180,
            "the search to complete",
        )
        progress = httpx.get(f"{base}/v1/searches/{search_id}", headers=headers).json()["progress"]
        assert progress["complete"] + progress["pruned"] == TRIALS
    finally:
        stop(worker)
        api.terminate()
        api.wait(timeout=20)
    assert_exact_budget(url, search_id)
