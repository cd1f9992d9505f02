"""Optuna's storage on our database URL: SQLite (one machine) or PostgreSQL (a worker pool)."""

from __future__ import annotations

import copy
import datetime
import functools
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, cast

import optuna
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.trial import FrozenTrial, Trial, TrialState
from sqlalchemy import Connection, create_engine, event, func, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import aliased
from sqlalchemy.pool import NullPool

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


@functools.cache
def optuna_head_revision() -> str:
    """The newest revision of Optuna's own schema (table `alembic_version`) this Optuna knows."""
    from optuna.storages import _rdb

    head = ScriptDirectory(str(Path(_rdb.__file__).with_name("alembic"))).get_current_head()
    assert head is not None, "the installed Optuna ships no schema revision"
    return head


def optuna_schema_is_current(connection: Connection) -> bool:
    """Whether Optuna's tables are there, stamped with the installed Optuna's schema revision."""
    return MigrationContext.configure(connection).get_current_revision() == optuna_head_revision()


@functools.lru_cache(maxsize=8)
def optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna RDB storage of `url` (cached per process).

    On a database whose Optuna schema is current (`caviar db upgrade`), this runs no DDL, so
    any number of workers may start at once; elsewhere (`caviar run`'s own file) Optuna creates
    its tables. Heartbeats are on: a trial whose worker stops writing them for `GRACE_PERIOD_S`
    is failed by the reaper and enqueued again with the same parameters (Optuna's stale-trial
    retry).
    """
    url = normalise_url(url)
    probe = create_engine(url, poolclass=NullPool)
    try:
        with probe.connect() as connection:
            current = optuna_schema_is_current(connection)
    finally:
        probe.dispose()
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_options(url),
            skip_table_creation=current,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=GRACE_PERIOD_S,
            heartbeat_stale_trial_callback=retry_stale_trial,
        )
    if make_url(url).get_backend_name() == "sqlite":
        with storage.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL is still safe against a crash of the process (only a power cut can
        # undo the last commits) and spares an fsync per report: Optuna commits every call.
        event.listen(storage.engine, "connect", _sync_normal)
        storage.engine.dispose()
    return storage


def _sync_normal(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


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


def fail_stale_trials(study: optuna.Study) -> int:
    """Fail and retry the study's running trials whose worker is gone; how many this call failed.

    Those whose last heartbeat is older than the grace period (as Optuna's `fail_stale_trials`
    does), and those that never got a heartbeat and started a grace period ago: Optuna only
    reaps trials with a heartbeat, and a worker that died (or lost its connection) between
    asking for a trial and writing its first heartbeat would leave it running forever.
    """
    from optuna.storages._rdb import models

    rdb = _rdb_of(study)
    # Naive local time: what Optuna's trials table hands back as a trial's start.
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=GRACE_PERIOD_S)
    with rdb.scoped_session() as session:
        orphans = [
            cast(int, trial.trial_id)  # Optuna's tables declare untyped columns
            for trial in session.query(models.TrialModel)
            .filter(models.TrialModel.study_id == study._study_id)
            .filter(models.TrialModel.state == optuna.trial.TrialState.RUNNING)
            .filter(~models.TrialModel.heartbeats.any())
            if trial.datetime_start is not None and trial.datetime_start < cutoff
        ]
    failed = 0
    for trial_id in [*rdb._get_stale_trial_ids(study._study_id), *orphans]:
        try:
            if not study._storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # its worker (or another reaper) finished it meanwhile
        retry_stale_trial(study, study._storage.get_trial(trial_id))
        failed += 1
    return failed


def annotate_finished_trial(
    storage: optuna.storages.BaseStorage, trial: FrozenTrial, attrs: dict[str, Any]
) -> None:
    """Add user attributes to a trial that is already finished.

    Optuna's storage API refuses to change finished trials, but some facts are only known after
    (the best trial's test figures, why the reaper failed a trial); they belong on the trial so
    that the dashboard shows them. This writes the rows Optuna itself would write, into its own
    table.
    """
    rdb = getattr(storage, "_backend", storage)  # a study wraps its RDB storage in a cache
    if not isinstance(rdb, optuna.storages.RDBStorage):
        raise TypeError("finished trials can only be annotated in an RDB storage")
    from optuna.storages._rdb.models import TrialUserAttributeModel

    with _transaction(rdb) as session:
        _write_attrs(session, TrialUserAttributeModel, [(trial._trial_id, attrs)])


def record_heartbeats(storage: optuna.storages.RDBStorage, trial_ids: Sequence[int]) -> None:
    """`storage.record_heartbeat` for each of `trial_ids`, in one transaction of three
    statements instead of a transaction of two or three for each trial."""
    from optuna.storages._rdb.models import TrialHeartbeatModel as Beat

    ids = sorted(set(trial_ids))
    if not ids:
        return
    with _transaction(storage) as session:
        session.execute(update(Beat).where(Beat.trial_id.in_(ids)).values(heartbeat=func.now()))
        beating = set(session.scalars(select(Beat.trial_id).where(Beat.trial_id.in_(ids))))
        session.add_all([Beat(trial_id=trial_id) for trial_id in ids if trial_id not in beating])


def trial_states(url: str, studies: Sequence[str]) -> Counter[TrialState]:
    """How many trials of the named studies are in each state: one query, no trials loaded.

    Reading a search's progress this way costs the same for 10 trials as for 10,000, where
    loading the trials through Optuna grows with their parameters, reports and attributes.
    """
    from optuna.storages._rdb import models  # the schema of the installed Optuna version

    if not studies:
        return Counter()
    rdb = optuna_storage(url)
    with rdb.scoped_session() as session:
        rows = (
            session.query(models.TrialModel.state, func.count())
            .join(models.StudyModel, models.StudyModel.study_id == models.TrialModel.study_id)
            .filter(models.StudyModel.study_name.in_(list(studies)))
            .group_by(models.TrialModel.state)
            .all()
        )
    return Counter({state: count for state, count in rows})


class TrialTally(NamedTuple):
    """What a stage's budget reads of one trial: its state and two of its user attributes."""

    state: TrialState
    reason: str | None  # why it failed, where it did
    epochs: int | None  # epochs it trained, once it ended


def trial_tallies(study: optuna.Study) -> list[TrialTally]:
    """Every trial of `study` as a `TrialTally`, in one query.

    Loading the trials through Optuna builds each running trial anew on every call (its
    parameters, reports and attributes); asking for trials under a search's lock needs only this.
    """
    from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel

    reason, epochs = aliased(TrialUserAttributeModel), aliased(TrialUserAttributeModel)
    with _rdb_of(study).scoped_session() as session:
        rows = (
            session.query(TrialModel.state, reason.value_json, epochs.value_json)
            .outerjoin(reason, (reason.trial_id == TrialModel.trial_id) & (reason.key == "reason"))
            .outerjoin(epochs, (epochs.trial_id == TrialModel.trial_id) & (epochs.key == "epochs"))
            .filter(TrialModel.study_id == study._study_id)
            .all()
        )
    return [
        TrialTally(
            state,
            None if why is None else json.loads(why),
            None if trained is None else int(json.loads(trained)),
        )
        for state, why, trained in rows
    ]


def create_trials(study: optuna.Study, count: int) -> list[Trial]:
    """`count` times `study.ask()` for a study known to hold no waiting trial: the same new
    trials, created in one transaction, without Optuna's read of every unfinished trial in
    search of one to run first.

    As Optuna does for each trial, this holds the study's row while it numbers them (on
    PostgreSQL; SQLite takes one writer at a time), so two workers never give one number twice.
    """
    from optuna.storages._rdb.models import StudyModel, TrialModel

    if count <= 0:
        return []
    study._thread_local.cached_all_trials = None  # as `ask` does: the next read syncs
    now = datetime.datetime.now()
    with _transaction(_rdb_of(study)) as session:
        StudyModel.find_or_raise_by_id(study._study_id, session, for_update=True)
        models = [
            TrialModel(
                study_id=study._study_id, number=None, state=TrialState.RUNNING, datetime_start=now
            )
            for _ in range(count)
        ]
        session.add_all(models)
        session.flush()
        # Numbered by id, as Optuna numbers them: under the study's lock no other trial of it
        # comes between these.
        models.sort(key=lambda model: int(model.trial_id))
        first = models[0].count_past_trials(session)
        for offset, model in enumerate(models):
            model.number = first + offset
        created = [_new_frozen_trial(model) for model in models]
    _add_to_cache(study, created)
    # Optuna's `Trial(study, id)` reads a running trial back from the database; these are built
    # from what was just written instead, through a copy of the study that answers that read.
    reader = copy.copy(study)
    reader._storage = cast(Any, _Created(study._storage, created))
    trials = [Trial(reader, frozen._trial_id) for frozen in created]
    for trial in trials:
        trial.study, trial.storage = study, study._storage
    return trials


class _Created:
    """A study's storage that answers `get_trial` for trials just created from their
    `FrozenTrial`s (a copy each, as a read would give) and passes every other call on."""

    def __init__(self, storage: Any, created: list[FrozenTrial]) -> None:
        self._storage = storage
        self._created = {frozen._trial_id: frozen for frozen in created}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        frozen = self._created.get(trial_id)
        if frozen is None:
            return self._storage.get_trial(trial_id)
        return copy.deepcopy(frozen)


def _new_frozen_trial(model: Any) -> FrozenTrial:
    """A new running trial's `FrozenTrial`, as Optuna builds it when it creates one."""
    return FrozenTrial(
        number=int(model.number),
        state=TrialState.RUNNING,
        value=None,
        values=None,
        datetime_start=model.datetime_start,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=int(model.trial_id),
    )


def _add_to_cache(study: optuna.Study, created: list[FrozenTrial]) -> None:
    """Register new trials with the caching wrapper Optuna puts around an RDB storage, as its own
    `create_new_trial` does (its writes look the trial's study up there)."""
    cache = study._storage
    if isinstance(cache, _CachedStorage):
        with cache._lock:
            if study._study_id not in cache._studies:
                cache._studies[study._study_id] = _StudyInfo()
            cache._add_trials_to_cache(study._study_id, created)


def report_epoch(study: optuna.Study, reports: Sequence[tuple[Trial, float, int]]) -> None:
    """`trial.report(value, epoch)` for many running trials of `study`, in one transaction.

    Optuna commits every report (after three queries), so a batch of trials reporting every
    epoch would pay that per trial per epoch for what is one write. This inserts the rows Optuna
    would, after one check that every trial still runs, and updates each trial's view as
    `Trial.report` does (a step already reported is ignored), so that pruners see the values.
    Each trial reports at its own epoch (trials of one batch may have started apart).
    """
    from optuna.storages._rdb.models import TrialIntermediateValueModel as Model

    fresh = [
        (t, v, e) for t, v, e in reports if e not in t._cached_frozen_trial.intermediate_values
    ]
    if not fresh:
        return
    rows = []
    for trial, value, epoch in fresh:
        stored, kind = Model.intermediate_value_to_stored_repr(float(value))
        rows.append(
            {
                "trial_id": trial._trial_id,
                "step": epoch,
                "intermediate_value": stored,
                "intermediate_value_type": kind,
            }
        )
    with _transaction(_rdb_of(study)) as session:
        _check_running(session, [trial for trial, _, _ in fresh])
        session.execute(insert(Model), rows)
    for trial, value, epoch in fresh:
        trial._cached_frozen_trial.intermediate_values[epoch] = float(value)


def set_user_attrs(study: optuna.Study, attrs: Sequence[tuple[Trial, dict[str, Any]]]) -> None:
    """`trial.set_user_attr(key, value)` for every key of many running trials, in one transaction.

    Optuna commits every attribute; a worker sets several on each trial of a batch at once.
    """
    from optuna.storages._rdb.models import TrialUserAttributeModel

    with _transaction(_rdb_of(study)) as session:
        _check_running(session, [trial for trial, _ in attrs])
        _write_attrs(
            session, TrialUserAttributeModel, [(trial._trial_id, values) for trial, values in attrs]
        )
    for trial, values in attrs:
        trial._cached_frozen_trial.user_attrs.update(values)


@contextmanager
def deferred_writes(study: optuna.Study, trials: Sequence[Trial]) -> Iterator[None]:
    """Keep the parameters that `trials` sample (`Trial.suggest_*`) and the user attributes they
    set inside the block, and write them all as it ends, in one transaction.

    Optuna commits each parameter and attribute on its own, after reading its trial; a claim's
    trials sample several each. Inside the block each trial sees its own values at once (Optuna's
    `Trial` keeps them), the sampler and the other trials see none of them yet (as with trials
    sampled one after the other by other workers). If the block or the write raises, nothing is
    written and the trials forget what they sampled in it.
    """
    from optuna.storages._rdb.models import TrialParamModel, TrialUserAttributeModel

    deferred = _DeferredWrites(study._storage)
    before = [_kept_values(trial) for trial in trials]
    for trial in trials:
        trial.storage = cast(Any, deferred)
    try:
        try:
            yield
        finally:
            for trial in trials:
                trial.storage = study._storage
        with _transaction(_rdb_of(study)) as session:
            _check_running(session, trials, lock=True)
            _check_distributions(session, study._study_id, deferred.distributions())
            if deferred.params:
                session.execute(insert(TrialParamModel), deferred.params)
            _write_attrs(session, TrialUserAttributeModel, list(deferred.attrs.items()))
    except BaseException:
        for trial, kept in zip(trials, before, strict=True):  # as if nothing was sampled
            frozen = trial._cached_frozen_trial
            frozen.params, frozen.distributions, frozen.user_attrs = kept
        raise


def _kept_values(trial: Trial) -> tuple[dict, dict, dict]:
    """Copies of what a trial keeps of its parameters, their distributions and attributes."""
    frozen = trial._cached_frozen_trial
    return dict(frozen.params), dict(frozen.distributions), dict(frozen.user_attrs)


class _DeferredWrites:
    """A trial's storage that keeps its parameters and user attributes for `deferred_writes`
    and hands every other call to the study's storage."""

    def __init__(self, storage: Any) -> None:
        self._storage = storage
        self.params: list[dict[str, Any]] = []  # rows of Optuna's trial_params table
        self.attrs: dict[int, dict[str, Any]] = {}  # user attributes by trial id
        self._distributions: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def set_trial_param(
        self, trial_id: int, name: str, internal_value: float, distribution: Any
    ) -> None:
        """What `RDBStorage.set_trial_param` writes, kept (checked against the study's earlier
        distribution of `name` as the block ends)."""
        from optuna.distributions import check_distribution_compatibility, distribution_to_json

        if name in self._distributions:
            check_distribution_compatibility(self._distributions[name], distribution)
        self._distributions.setdefault(name, distribution)
        self.params.append(
            {
                "trial_id": trial_id,
                "param_name": name,
                "param_value": internal_value,
                "distribution_json": distribution_to_json(distribution),
            }
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        """What `RDBStorage.set_trial_user_attr` writes, kept."""
        json.dumps(value)  # refuse, as Optuna does, a value JSON cannot hold, before anything
        self.attrs.setdefault(trial_id, {})[key] = value

    def distributions(self) -> dict[str, Any]:
        """The distribution of each parameter name sampled in the block."""
        return dict(self._distributions)


def _check_distributions(session: Any, study_id: int, sampled: dict[str, Any]) -> None:
    """Refuse parameters whose distribution does not fit the one the study already stores under
    the same name (Optuna's check before it writes a parameter)."""
    from optuna.distributions import check_distribution_compatibility, json_to_distribution
    from optuna.storages._rdb.models import TrialModel, TrialParamModel

    if not sampled:
        return
    stored = (
        session.query(TrialParamModel.param_name, func.min(TrialParamModel.distribution_json))
        .join(TrialModel, TrialModel.trial_id == TrialParamModel.trial_id)
        .filter(TrialModel.study_id == study_id, TrialParamModel.param_name.in_(list(sampled)))
        .group_by(TrialParamModel.param_name)
    )
    for name, distribution in stored:
        check_distribution_compatibility(json_to_distribution(distribution), sampled[name])


class Finished(NamedTuple):
    """A running trial that ended: its state (complete or pruned), its value (complete trials)
    and the user attributes to record with it."""

    trial: Trial
    state: TrialState
    value: float | None
    attrs: dict[str, Any]


def finish_trials(study: optuna.Study, finished: Sequence[Finished]) -> list[Finished]:
    """`study.tell` for many running trials of `study` that completed or were pruned, with their
    user attributes, in one transaction; the trials told.

    Optuna reads each trial twice and commits its state, its value and each attribute apart. As
    `tell` does, a pruned trial's value is its last report unless that is NaN, and the
    sampler's `after_trial` sees each trial first. A trial that has finished meanwhile (the
    reaper failed it) is left as it is, as `tell(skip_if_finished=True)` leaves it, and the
    others are told. Raises ValueError for a complete trial without a value (or NaN).
    """
    from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel, TrialValueModel

    if not finished:
        return []
    values = {f.trial._trial_id: _told_value(f) for f in finished}
    study._thread_local.cached_all_trials = None  # as `tell` does
    # The sampler first, outside the transaction below: it may read the storage, whose
    # sessions would end that transaction's.
    with _transaction(_rdb_of(study)) as session:
        states = dict(
            session.query(TrialModel.trial_id, TrialModel.state).filter(
                TrialModel.trial_id.in_(list(values))
            )
        )
    for f in finished:
        if not states[f.trial._trial_id].is_finished():
            frozen, value = f.trial._cached_frozen_trial, values[f.trial._trial_id]
            filtered = optuna.pruners._filter_study(study, frozen)
            study.sampler.after_trial(filtered, frozen, f.state, None if value is None else [value])
    now = datetime.datetime.now()
    with _transaction(_rdb_of(study)) as session:
        rows = (
            session.query(TrialModel)
            .filter(TrialModel.trial_id.in_(sorted(values)))
            .order_by(TrialModel.trial_id)
            .with_for_update()
        )
        running = {row.trial_id: row for row in rows if not row.state.is_finished()}
        told = [f for f in finished if f.trial._trial_id in running]
        stored_values = []
        for f in told:
            value = values[f.trial._trial_id]
            if value is not None:
                stored, kind = TrialValueModel.value_to_stored_repr(value)
                stored_values.append(
                    {
                        "trial_id": f.trial._trial_id,
                        "objective": 0,
                        "value": stored,
                        "value_type": kind,
                    }
                )
        if stored_values:
            session.execute(insert(TrialValueModel), stored_values)
        _write_attrs(session, TrialUserAttributeModel, [(f.trial._trial_id, f.attrs) for f in told])
        for f in told:
            row = running[f.trial._trial_id]
            row.state, row.datetime_complete = f.state, now
    for f in told:
        f.trial._cached_frozen_trial.user_attrs.update(f.attrs)
    return told


def _told_value(finished: Finished) -> float | None:
    """The value `tell` records: a complete trial's own; a pruned one's last report unless NaN."""
    if finished.state == TrialState.COMPLETE:
        if finished.value is None or math.isnan(finished.value):
            raise ValueError(f"a complete trial needs a value, not {finished.value}")
        return float(finished.value)
    if finished.state != TrialState.PRUNED:
        raise ValueError(f"finish_trials tells complete or pruned trials, not {finished.state}")
    reports = finished.trial._cached_frozen_trial.intermediate_values
    last = reports[max(reports)] if reports else None
    return None if last is None or math.isnan(last) else float(last)


def set_system_attrs(study: optuna.Study, attrs: Sequence[tuple[Trial, dict[str, Any]]]) -> None:
    """`storage.set_trial_system_attr` for every key of many running trials, in one transaction
    (a pruner records a rung for each trial reaching one; Optuna commits each)."""
    from optuna.storages._rdb.models import TrialSystemAttributeModel as Model

    with _transaction(_rdb_of(study)) as session:
        _check_running(session, [trial for trial, _ in attrs])
        _write_attrs(session, Model, [(trial._trial_id, values) for trial, values in attrs])


class TrialAttrs(NamedTuple):
    """A trial's state and some of its system attributes: what a pruner that compares trials by
    their recorded rungs reads of each (`search.pruning`)."""

    state: TrialState
    system_attrs: dict[str, Any]


def system_attrs_with_prefix(study: optuna.Study, prefix: str) -> dict[int, TrialAttrs]:
    """Every trial of `study` by trial id, with its system attributes whose keys start with
    `prefix`: one query, where `study.get_trials` loads every trial's params, reports and
    attributes."""
    from optuna.storages._rdb.models import TrialModel
    from optuna.storages._rdb.models import TrialSystemAttributeModel as Model

    named = Model.key.startswith(prefix, autoescape=True)
    with _transaction(_rdb_of(study)) as session:
        rows = (
            session.query(TrialModel.trial_id, TrialModel.state, Model.key, Model.value_json)
            .outerjoin(Model, (Model.trial_id == TrialModel.trial_id) & named)
            .filter(TrialModel.study_id == study._study_id)
            .all()
        )
    trials: dict[int, TrialAttrs] = {}
    for trial_id, state, key, value in rows:
        attrs = trials.setdefault(trial_id, TrialAttrs(state, {})).system_attrs
        if key is not None:
            attrs[key] = json.loads(value)
    return trials


def _rdb_of(study: optuna.Study) -> optuna.storages.RDBStorage:
    # A study may hold a caching wrapper around the RDB storage it was loaded from.
    return cast(optuna.storages.RDBStorage, getattr(study._storage, "_backend", study._storage))


@contextmanager
def _transaction(rdb: optuna.storages.RDBStorage) -> Iterator[Any]:
    """A session of Optuna's own, committed at the end (Optuna's errors on failure)."""
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session) as session:
        yield session


def _check_running(session: Any, trials: Sequence[Trial], *, lock: bool = False) -> None:
    """Refuse, before anything is written, to change a trial that has finished; with `lock`,
    hold the trials' rows (in id order) until the transaction ends, so that the reaper cannot
    fail one of them meanwhile."""
    from optuna.storages._rdb.models import TrialModel

    ids = sorted(trial._trial_id for trial in trials)
    query = (
        session.query(TrialModel.trial_id, TrialModel.state)
        .filter(TrialModel.trial_id.in_(ids))
        .order_by(TrialModel.trial_id)
    )
    _refuse_finished(trials, dict(query.with_for_update() if lock else query))


def _refuse_finished(trials: Sequence[Trial], states: dict[int, TrialState]) -> None:
    """Raise if one of `trials` is not in `states` (by trial id) or has finished there."""
    for trial in trials:
        if trial._trial_id not in states:
            raise KeyError(f"no trial with id {trial._trial_id}")
        if states[trial._trial_id].is_finished():
            message = f"Trial#{trial.number} has already finished and can not be updated."
            raise optuna.exceptions.UpdateFinishedTrialError(message)


def _write_attrs(session: Any, model: Any, attrs: Sequence[tuple[int, dict[str, Any]]]) -> None:
    """Replace user or system attributes (`model`), given as (trial id, {key: value}), as Optuna
    stores them."""
    for trial_id, values in attrs:
        keys = model.key.in_(list(values))
        session.query(model).filter(model.trial_id == trial_id, keys).delete()
    rows = [
        {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
        for trial_id, values in attrs
        for key, value in values.items()
    ]
    if rows:
        session.execute(insert(model), rows)
