"""A worker's Prometheus metrics, read from a real `caviar worker` as Prometheus scrapes them."""

import contextlib
import os
import re
import signal
import socket
import time
from typing import TYPE_CHECKING

import httpx
import jax
import pytest

from caviar.db.migrate import upgrade
from caviar.db.session import session_scope
from caviar.db.tables import OPEN_STATUSES, Search
from caviar.search.spec import parse_spec
from caviar.service.searches import submit_search

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.e2e.test_service import free_port, start
else:
    from test_service import free_port, start

TRIALS, EPOCHS, BATCH = 6, 3, 4
# No pruner and a small learning rate: every trial trains every epoch. Two stages of 4 and 2
# trials, claimed by one worker of batch 4: batches of 4 and 2 trials.
SPEC = f"""
name: metrics
dataset: {{name: synthetic, samples: 400, features: 6, classes: 3}}
budget: {{trials: {TRIALS}, epochs: {EPOCHS}}}
space:
  learning_rate: {{low: 1.0e-3, high: 1.0e-2, scale: log}}
fixed: {{optimizer: adam, batch_size: 32, hidden_units: 8, hidden_layers: 1}}
stages: [{{trials: 4}}, {{trials: 2}}]
"""
SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def queue(url: str) -> str:
    with session_scope(url) as session:
        search, _ = submit_search(
            session, "alice", parse_spec(SPEC), idempotency_key=None, max_concurrent=10
        )
        return search.id


def status(url: str, search_id: str) -> str:
    with session_scope(url) as session:
        return session.get_one(Search, search_id).status


def scrape(port: int) -> dict[str, float]:
    """Every sample of the worker's /metrics, keyed `name` or `name{labels}`."""
    answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in answer.text.splitlines():
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        key = match["name"] + (f"{{{match['labels']}}}" if match["labels"] else "")
        samples[key] = float(match["value"])
    return samples


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (Linux: its sockets' inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def train_one_search(url: str, env: dict[str, str]) -> dict[str, float]:
    """Run a worker with metrics on a free port until a new search completes; its metrics."""
    port = free_port()
    search_id = queue(url)
    worker = start(
        "worker",
        "--batch",
        str(BATCH),
        "--idle-sleep",
        "0.2",
        env={**env, "CAVIAR_WORKER_METRICS_PORT": str(port)},
    )
    try:
        line = worker.stdout.readline()
        assert f"metrics: http://127.0.0.1:{port}/metrics" in line, line
        assert listening_ports(worker.pid) == {port}
        assert scrape(port)["caviar_worker_trial_epochs_total"] == 0
        deadline = time.monotonic() + 300
        while status(url, search_id) in OPEN_STATUSES:
            assert time.monotonic() < deadline, "the search did not end"
            assert worker.poll() is None, worker.stdout.read()
            time.sleep(0.2)
        assert status(url, search_id) == "completed"
        return scrape(port)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)


@pytest.fixture
def env(postgres_url, tmp_path) -> dict[str, str]:
    upgrade(postgres_url)
    return {
        **os.environ,
        "CAVIAR_DATABASE_URL": postgres_url,
        "CAVIAR_COMPILE_CACHE": str(tmp_path / "xla-cache"),
    }


def test_a_worker_serves_what_it_trained_and_compiled(postgres_url, env):
    first = train_one_search(postgres_url, env)
    trained = {
        state: first[f'caviar_worker_trials_trained_total{{state="{state}"}}']
        for state in ("complete", "pruned", "fail")
    }
    assert trained["complete"] + trained["pruned"] == TRIALS and trained["fail"] == 0
    assert first["caviar_worker_trial_epochs_total"] == TRIALS * EPOCHS  # nothing was pruned
    assert first["caviar_worker_slot_occupancy"] == (4 + 2) / (2 * BATCH)
    assert first["caviar_worker_trials_per_minute"] > 0
    assert first["caviar_worker_heartbeats_total"] >= TRIALS
    assert first["caviar_worker_compile_seconds_total"] > 0
    assert first["caviar_worker_compiles_total"] > 0
    assert first["caviar_worker_compilation_cache_hits_total"] == 0  # the cache was empty
    assert first["caviar_worker_reaped_trials_total"] == 0
    assert sum(v for k, v in first.items() if "database_errors" in k) == 0
    # Device memory is exported where the backend reports it (GPUs, TPUs), never on a CPU.
    reported = any(device.memory_stats() for device in jax.local_devices())
    assert any("device_memory_bytes_in_use" in k for k in first) == reported

    # A new worker on the same compilation cache reads the programs instead of compiling them.
    second = train_one_search(postgres_url, env)
    assert second["caviar_worker_compilation_cache_hits_total"] > 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_worker_serves_no_metrics_unless_told_to(backend, postgres_url, tmp_path):
    url = f"sqlite:///{tmp_path / 'caviar.db'}" if backend == "sqlite" else postgres_url
    upgrade(url)
    worker = start("worker", env={**os.environ, "CAVIAR_DATABASE_URL": url})
    try:
        line = worker.stdout.readline()
        assert line.startswith("worker on") and "metrics" not in line, line
        assert listening_ports(worker.pid) == set()
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    assert worker.returncode == 0


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    upgrade(url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = start(
            "worker",
            env={**os.environ, "CAVIAR_DATABASE_URL": url, "CAVIAR_WORKER_METRICS_PORT": str(port)},
        )
        out, _ = worker.communicate(timeout=120)
    assert worker.returncode == 2
    assert out.strip() == f"error: worker metrics on 127.0.0.1:{port}: Address already in use"
