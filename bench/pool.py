"""The worker pool on PostgreSQL: throughput with 1 and 2 workers, recovery after SIGKILL,
database connections per worker.

    python -m bench.pool [--trials 16] [--epochs 30] [--grace 10]

Uses (and wipes) the database `caviar_bench` on the local PostgreSQL server
(`CAVIAR_BENCH_POSTGRES_URL` to change). Workers are real `caviar worker` processes; each names
itself in `application_name` so its connections can be counted in `pg_stat_activity`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from typing import cast

import optuna
from sqlalchemy import create_engine, text

from bench.common import machine, print_table

BENCH_URL = os.environ.get(
    "CAVIAR_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/caviar_bench"
)
#: The benchmark database's server, for creating and watching that database.
ADMIN_URL = BENCH_URL.rsplit("/", 1)[0] + "/postgres"


def spec_text(trials: int, epochs: int) -> str:
    return f"""
name: pool-bench
dataset: {{name: synthetic, samples: 4000, features: 32, classes: 5}}
budget: {{trials: {trials}, epochs: {epochs}}}
space:
  learning_rate: {{low: 1.0e-4, high: 1.0e-1, scale: log}}
  momentum: {{low: 0.8, high: 0.99, scale: one_minus_log}}
fixed: {{optimizer: adam, batch_size: 64, hidden_units: 128, hidden_layers: 2}}
"""


def fresh_database() -> None:
    """Drop and create the benchmark database, then apply the migrations."""
    from caviar.db.migrate import upgrade

    name = BENCH_URL.rsplit("/", 1)[1]
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    upgrade(BENCH_URL)


def submit(trials: int, epochs: int) -> str:
    from caviar.db.session import session_scope
    from caviar.search.spec import parse_spec
    from caviar.service.searches import submit_search

    with session_scope(BENCH_URL) as session:
        search, _ = submit_search(
            session,
            "bench",
            parse_spec(spec_text(trials, epochs)),
            idempotency_key=None,
            max_concurrent=100,
        )
        return search.id


def start_worker(name: str, grace: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "CAVIAR_DATABASE_URL": f"{BENCH_URL}?application_name={name}",
        "CAVIAR_HEARTBEAT_S": str(max(1, grace // 5)),
        "CAVIAR_GRACE_S": str(grace),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "caviar.service.cli",
            "worker",
            "--batch",
            "4",
            "--idle-sleep",
            "0.2",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def search_trials(search_id: str) -> list[optuna.trial.FrozenTrial]:
    from caviar.db.session import session_scope
    from caviar.db.tables import Search

    with session_scope(BENCH_URL) as session:
        search = session.get(Search, search_id)
        assert search is not None
        studies = list(search.studies)
    storage = optuna.storages.RDBStorage(BENCH_URL)
    return [
        t for name in studies for t in optuna.load_study(study_name=name, storage=storage).trials
    ]


def status(search_id: str) -> str:
    from caviar.db.session import session_scope
    from caviar.db.tables import Search

    with session_scope(BENCH_URL) as session:
        search = session.get(Search, search_id)
        assert search is not None
        return search.status


def connections() -> dict[str, int]:
    """Open connections to the benchmark database by application name."""
    admin = create_engine(ADMIN_URL)
    with admin.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT application_name, count(*) FROM pg_stat_activity "
                "WHERE datname = :name GROUP BY application_name"
            ),
            {"name": BENCH_URL.rsplit("/", 1)[1]},
        ).all()
    admin.dispose()
    return {name: count for name, count in rows if name.startswith("caviar-worker")}


def wait(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the pool did not get there in time")
        time.sleep(0.2)


def throughput(workers: int, trials: int, epochs: int, grace: int) -> dict:
    """Trials per minute of one search with `workers` workers, and their connections."""
    search_id = submit(trials, epochs)
    processes = [start_worker(f"caviar-worker-{i}", grace) for i in range(workers)]
    peak: dict[str, int] = {}
    try:
        wait(lambda: any(t.state.name == "RUNNING" for t in search_trials(search_id)), 120)
        while status(search_id) != "completed":
            for name, count in connections().items():
                peak[name] = max(peak.get(name, 0), count)
            time.sleep(0.5)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    found = search_trials(search_id)
    start = min(cast(datetime, t.datetime_start) for t in found)  # every trial ran
    end = max(t.datetime_complete for t in found if t.datetime_complete)
    minutes = (end - start).total_seconds() / 60
    return {
        "workers": workers,
        "trials": len(found),
        "minutes": minutes,
        "trials_per_min": len(found) / minutes,
        "max_connections_per_worker": max(peak.values(), default=0),
    }


def recovery(trials: int, epochs: int, grace: int) -> dict:
    """Seconds from a worker's death mid-trial to its trials running again on another.

    The victim is frozen (SIGSTOP: no more heartbeats, as if it died) the moment it trains, so
    that however fast the machine it dies with trials in hand; it is SIGKILLed once the survivor
    is connected, and the time counts from the freeze.
    """
    search_id = submit(trials, epochs)
    victim = start_worker("caviar-worker-victim", grace)
    survivor = None
    try:
        wait(lambda: any(t.state.name == "RUNNING" for t in search_trials(search_id)), 120)
        victim.send_signal(signal.SIGSTOP)
        killed_at = time.time()
        survivor = start_worker("caviar-worker-survivor", grace)
        wait(lambda: "caviar-worker-survivor" in connections(), 120)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)

        def rerun() -> bool:
            return any(
                t.system_attrs.get("failed_trial") is not None and t.datetime_start
                for t in search_trials(search_id)
            )

        wait(rerun, grace * 6 + 60)
        rerun_at = min(
            t.datetime_start.timestamp()
            for t in search_trials(search_id)
            if t.system_attrs.get("failed_trial") is not None and t.datetime_start
        )
        wait(lambda: status(search_id) == "completed", 600)
    finally:
        for process in (victim, survivor):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    return {
        "grace_s": grace,
        "sigkill_to_rerun_s": rerun_at - killed_at,
        "completed_trials": sum(t.state.name == "COMPLETE" for t in search_trials(search_id)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--grace", type=int, default=10, help="heartbeat grace period, seconds")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    info = machine()
    print(f"machine: {info}")
    print(
        f"workload: {args.trials} trials × {args.epochs} epochs, synthetic 4000×32, MLP "
        f"32→128→128→5 adam, batch 64; workers claim 4 trials at a time; PostgreSQL"
    )
    fresh_database()
    rows = [throughput(n, args.trials, args.epochs, args.grace) for n in (1, 2)]
    rows[1]["speedup"] = rows[1]["trials_per_min"] / rows[0]["trials_per_min"]
    rows[0]["speedup"] = 1.0
    print_table(
        rows,
        ["workers", "trials", "minutes", "trials_per_min", "speedup", "max_connections_per_worker"],
    )
    kill = recovery(args.trials, args.epochs, args.grace)
    print(
        f"SIGKILL → trial running again on another worker: {kill['sigkill_to_rerun_s']:.1f} s "
        f"(grace period {args.grace} s); search completed with {kill['completed_trials']} "
        f"complete trials of {args.trials}"
    )
    print(json.dumps({"benchmark": "pool", "machine": info, "throughput": rows, "recovery": kill}))


if __name__ == "__main__":
    main()
