"""Optuna's storage on our database URL: SQLite (one machine) or PostgreSQL (a worker pool)."""

from __future__ import annotations

import datetime
import functools
import json
import os
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

DEFAULT_DATABASE_URL = "sqlite:///caviar.db"


def normalise_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs that name no driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def engine_options(url: str) -> dict:
    """Connection options per backend: a busy timeout for SQLite, small checked pools otherwise."""
    if make_url(url).get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": 30}}
    return {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 2, "pool_recycle": 1800}


#: Seconds between the heartbeats a worker writes for each running trial, and how old the last
#: one may be before any worker or the API fails the trial and re-enqueues it.
HEARTBEAT_INTERVAL_S = int(os.environ.get("CAVIAR_HEARTBEAT_S", "10"))
GRACE_PERIOD_S = int(os.environ.get("CAVIAR_GRACE_S", "60"))


@functools.lru_cache(maxsize=8)
def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage of `url` (cached per process; creates Optuna's tables if missing).

    Heartbeats are on: a trial whose worker stops writing them for `GRACE_PERIOD_S` is failed
    by the reaper and enqueued again with the same parameters (Optuna's stale-trial retry).
    """
    url = normalise_url(url)
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_options(url),
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=retry_stale_trial,
        )
    if make_url(url).get_backend_name() == "sqlite":
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    return storage


#: How many times a trial whose worker vanished or was preempted is run again.
MAX_RETRIES = 3


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Enqueue a failed trial again with the same parameters (at most `MAX_RETRIES` times).

    Like Optuna's stale-trial retry (`failed_trial` and `retry_history` system attributes), but
    the retry starts without the failed run's user attributes (its failure reason, its figures).
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRIES:
        return
    study.add_trial(
        optuna.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            system_attrs={"failed_trial": trial.number, "retry_history": history},
        )
    )


def retry_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """The reaper's callback: record why the trial failed, then run it again."""
    annotate_finished_trial(
        study._storage,
        trial,
        {"reason": "stale", "message": f"no heartbeat for {GRACE_PERIOD_S} s: its worker died"},
    )
    retry_trial(study, trial)


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Fail and retry running trials that never got a heartbeat and started a grace period ago.

    Optuna only reaps trials with a heartbeat; a worker that died (or lost its connection)
    between asking for a trial and writing its first heartbeat would leave it running forever.
    """
    from optuna.storages._rdb import models

    rdb = getattr(study._storage, "_backend", study._storage)
    cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=GRACE_PERIOD_S)
    with rdb.scoped_session() as session:
        orphans = [
            trial.trial_id
            for trial in session.query(models.TrialModel)
            .filter(models.TrialModel.study_id == study._study_id)
            .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
            .filter(~models.TrialModel.heartbeats.any())
            if trial.datetime_start is not None and trial.datetime_start < cutoff
        ]
    for trial_id in orphans:
        try:
            failed = study._storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker (or another reaper) finished it meanwhile
        if failed:
            retry_stale_trial(study, study._storage.get_trial(trial_id))


def annotate_finished_trial(
    storage: optuna.storages.BaseStorage, trial: FrozenTrial, attrs: dict[str, Any]
) -> None:
    """Add user attributes to a trial that is already finished.

    Optuna's storage API refuses to change finished trials, but some facts are only known after
    (the best trial's test figures, why the reaper failed a trial); they belong on the trial so
    that the dashboard shows them. This writes the rows Optuna itself would write, into its own
    table.
    """
    from optuna.storages._rdb import models  # the schema of the installed Optuna version

    rdb = getattr(storage, "_backend", storage)  # a study wraps its RDB storage in a cache
    if not isinstance(rdb, optuna.storages.RDBStorage):
        raise TypeError("finished trials can only be annotated in an RDB storage")
    with rdb.scoped_session() as session:
        for key, value in attrs.items():
            session.query(models.TrialUserAttributeModel).filter_by(
                trial_id=trial._trial_id, key=key
            ).delete()
            session.add(
                models.TrialUserAttributeModel(
                    trial_id=trial._trial_id, key=key, value_json=json.dumps(value)
                )
            )
        session.commit()
