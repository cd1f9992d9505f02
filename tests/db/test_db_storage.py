"""Writes into Optuna's tables that Optuna's public API makes one commit at a time."""

from __future__ import annotations

import datetime

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import event

from caviar.db.storage import (
    GRACE_PERIOD_S,
    Finished,
    TrialTally,
    create_trials,
    deferred_writes,
    fail_stale_trials,
    finish_trials,
    optuna_storage,
    record_heartbeats,
    report_epoch,
    set_user_attrs,
    trial_states,
    trial_tallies,
)


def test_report_epoch_writes_every_trials_value_where_optuna_and_pruners_read_it(database_url):
    study = optuna.create_study(
        storage=optuna_storage(database_url),
        direction="maximize",
        pruner=optuna.pruners.ThresholdPruner(lower=0.5),
    )
    trials = [study.ask() for _ in range(3)]
    for epoch, values in enumerate([(0.6, 0.7, 0.8), (0.4, 0.9, 0.6)]):
        report_epoch(study, [(t, v, epoch) for t, v in zip(trials, values, strict=True)])
    report_epoch(study, [(trials[2], 0.1, 5)])  # a trial reports at its own epoch

    stored = {t.number: t.intermediate_values for t in study.get_trials()}
    assert stored == {0: {0: 0.6, 1: 0.4}, 1: {0: 0.7, 1: 0.9}, 2: {0: 0.8, 1: 0.6, 5: 0.1}}
    assert [t.should_prune() for t in trials] == [True, False, True]  # by each last report


def test_report_epoch_refuses_a_finished_trial_and_writes_nothing(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    running, finished = study.ask(), study.ask()
    study.tell(finished, 1.0)
    with pytest.raises(RuntimeError, match="finished"):
        report_epoch(study, [(running, 0.5, 0), (finished, 0.5, 0)])
    assert [t.intermediate_values for t in study.get_trials()] == [{}, {}]


def test_set_user_attrs_writes_and_replaces_every_trials_attributes(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    first, second = study.ask(), study.ask()
    first.set_user_attr("epochs", 1)
    set_user_attrs(study, [(first, {"epochs": 3, "best": [0.5]}), (second, {"epochs": 4})])

    assert first.user_attrs == {"epochs": 3, "best": [0.5]}
    assert [t.user_attrs for t in study.get_trials()] == [
        {"epochs": 3, "best": [0.5]},
        {"epochs": 4},
    ]


def test_set_user_attrs_refuses_a_finished_trial_and_writes_nothing(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    running, finished = study.ask(), study.ask()
    study.tell(finished, 1.0)
    with pytest.raises(RuntimeError, match="finished"):
        set_user_attrs(study, [(running, {"epochs": 1}), (finished, {"epochs": 1})])
    assert [t.user_attrs for t in study.get_trials()] == [{}, {}]


def test_trial_states_counts_only_the_named_studies(database_url):
    storage = optuna_storage(database_url)
    ours = [optuna.create_study(storage=storage, study_name=f"ours-{n}") for n in (1, 2)]
    other = optuna.create_study(storage=storage, study_name="other")
    ours[0].tell(ours[0].ask(), 1.0)
    ours[0].tell(ours[0].ask(), state=TrialState.PRUNED)
    ours[1].ask()
    ours[1].enqueue_trial({})
    other.tell(other.ask(), 2.0)

    counts = trial_states(database_url, ["ours-1", "ours-2", "missing"])

    assert counts == {
        TrialState.COMPLETE: 1,
        TrialState.PRUNED: 1,
        TrialState.RUNNING: 1,
        TrialState.WAITING: 1,
    }
    assert trial_states(database_url, []) == {}


def test_trial_tallies_read_each_trials_state_reason_and_epochs_of_one_study(database_url):
    storage = optuna_storage(database_url)
    study, other = (optuna.create_study(storage=storage) for _ in range(2))
    other.tell(other.ask(), 1.0)
    done, failed, running = study.ask(), study.ask(), study.ask()
    done.set_user_attr("epochs", 7)
    study.tell(done, 0.5)
    failed.set_user_attr("reason", "diverged")
    study.tell(failed, state=TrialState.FAIL)
    study.enqueue_trial({"x": 1.0})
    assert sorted(trial_tallies(study), key=lambda t: t.state.value) == [
        TrialTally(TrialState.RUNNING, None, None),
        TrialTally(TrialState.COMPLETE, None, 7),
        TrialTally(TrialState.FAIL, "diverged", None),
        TrialTally(TrialState.WAITING, None, None),
    ]
    assert running.number == 2


def test_create_trials_are_the_next_trials_ask_would_give(database_url):
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(storage=optuna_storage(database_url), sampler=sampler)
    first = study.ask()
    created = create_trials(study, 3)
    assert [t.number for t in created] == [first.number + 1, first.number + 2, first.number + 3]
    assert created[1].suggest_float("x", 0.0, 1.0) == study.get_trials()[2].params["x"]
    study.tell(created[1], 0.25)
    assert study.ask().number == first.number + 4
    assert create_trials(study, 0) == []
    assert [t.state for t in study.get_trials()] == [
        TrialState.RUNNING,
        TrialState.RUNNING,
        TrialState.COMPLETE,
        TrialState.RUNNING,
        TrialState.RUNNING,
    ]
    assert all(t.datetime_start is not None for t in study.get_trials())
    (alone,) = create_trials(study, 1)  # a sampler that reads nothing first: Optuna's cache
    alone.suggest_int("units", 8, 64)  # knows the trial, so its own writes find it
    assert study.get_trials()[alone.number].params == alone.params


def test_create_trials_reads_as_much_for_many_trials_as_for_one(database_url):
    """Its trials come from what it wrote, not from a read of each (a round trip a trial)."""
    storage = optuna_storage(database_url)
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    reads: list[str] = []

    def count(_conn, _cursor, statement: str, *_args) -> None:
        reads.extend([statement] if statement.lstrip().upper().startswith("SELECT") else [])

    engine = storage.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        create_trials(study, 1)
        one, reads[:] = len(reads), []
        created = create_trials(study, 8)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert len(reads) == one
    for trial in created:  # what `Trial(study, id)` would have read, and the study's own storage
        assert trial._cached_frozen_trial == storage.get_trial(trial._trial_id)
        assert trial.study is study and trial.storage is study._storage
    created[3].suggest_float("x", 0.0, 1.0)
    assert study.get_trials()[created[3].number].params == created[3].params


def _sample(trial: optuna.Trial) -> None:
    trial.suggest_float("lr", 1e-4, 1.0, log=True)
    trial.suggest_int("units", 8, 64)
    trial.suggest_categorical("optimizer", ["adam", "momentum"])
    trial.set_user_attr("beta", 0.9)


def test_deferred_writes_store_what_sampling_one_by_one_stores(database_url):
    storage = optuna_storage(database_url)
    studies = [
        optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(seed=3))
        for _ in range(2)
    ]
    one_by_one = [studies[0].ask() for _ in range(3)]
    for trial in one_by_one:
        _sample(trial)
    deferred = [studies[1].ask() for _ in range(3)]
    with deferred_writes(studies[1], deferred):
        for trial in deferred:
            _sample(trial)
        assert all(t.params == {} for t in studies[1].get_trials())  # nothing written yet

    def stored(study):
        return [(t.params, t.distributions, t.user_attrs) for t in study.get_trials()]

    assert stored(studies[1]) == stored(studies[0])
    assert [t.params for t in deferred] == [t.params for t in studies[1].get_trials()]
    studies[1].tell(deferred[0], 0.5)  # the trials are Optuna's as before
    assert studies[1].best_trial.params == deferred[0].params


def test_deferred_writes_write_nothing_when_the_block_raises(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    trial = study.ask()
    with pytest.raises(RuntimeError, match="sampler failed"), deferred_writes(study, [trial]):
        _sample(trial)
        raise RuntimeError("sampler failed")
    (stored,) = study.get_trials()
    assert (stored.params, stored.user_attrs) == ({}, {})
    assert (trial.params, trial.user_attrs) == ({}, {})  # it forgot what it sampled
    trial.suggest_float("x", 0.0, 1.0)  # the trial writes through its storage again
    assert study.get_trials()[0].params == {"x": trial.params["x"]}


def test_deferred_writes_refuse_a_finished_trial_or_a_changed_distribution(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    earlier = study.ask()
    earlier.suggest_float("x", 0.0, 1.0)
    finished, running = study.ask(), study.ask()
    study.tell(finished, 1.0)
    with pytest.raises(RuntimeError, match="finished"), deferred_writes(study, [running, finished]):
        running.suggest_float("y", 0.0, 1.0)
    with (
        pytest.raises(ValueError, match="different distribution"),
        deferred_writes(study, [running]),
    ):
        running.suggest_categorical("x", ["a", "b"])
    assert [t.params for t in study.get_trials()][1:] == [{}, {}]


def _ended_after_start(trial: optuna.trial.FrozenTrial) -> bool:
    start, end = trial.datetime_start, trial.datetime_complete
    return start is not None and end is not None and 0 <= (end - start).total_seconds() < 60


def test_finish_trials_store_what_tell_stores(database_url):
    storage = optuna_storage(database_url)
    told, finished = (  # Hyperband: the sampler sees each trial in its bracket, read from storage
        optuna.create_study(
            storage=storage,
            direction="maximize",
            pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=3),
        )
        for _ in range(2)
    )
    reports = [[0.4, 0.6], [0.3, float("nan")], [0.2]]
    ends = [(TrialState.COMPLETE, 0.7), (TrialState.PRUNED, None), (TrialState.PRUNED, None)]
    for study in (told, finished):
        trials = [study.ask() for _ in reports]
        for trial, values in zip(trials, reports, strict=True):
            report_epoch(study, [(trial, v, epoch) for epoch, v in enumerate(values)])
        attrs = [{"epochs": len(values), "best": [0.1]} for values in reports]
        if study is told:
            for trial, (state, value), extra in zip(trials, ends, attrs, strict=True):
                set_user_attrs(study, [(trial, extra)])
                study.tell(trial, value, state=state)
        else:
            finish_trials(
                study,
                [
                    Finished(trial, state, value, extra)
                    for trial, (state, value), extra in zip(trials, ends, attrs, strict=True)
                ],
            )
            assert trials[0].user_attrs == attrs[0]

    def stored(study):
        return [
            (t.state, t.values, t.user_attrs, repr(t.intermediate_values), _ended_after_start(t))
            for t in study.get_trials()
        ]

    assert stored(finished) == stored(told)
    assert [t.values for t in finished.get_trials()] == [[0.7], None, [0.2]]  # NaN: no value
    assert finished.best_trial.number == 0


def test_finish_trials_leave_a_trial_the_reaper_failed_and_tell_the_others(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    first, reaped, last = study.ask(), study.ask(), study.ask()
    study.tell(reaped, state=TrialState.FAIL)  # as the reaper fails a trial of a dead worker
    ends = [
        Finished(trial, TrialState.COMPLETE, float(n), {"epochs": n})
        for n, trial in enumerate((first, reaped, last))
    ]
    told = finish_trials(study, ends)
    assert [f.trial.number for f in told] == [0, 2]
    assert [(t.state, t.values, t.user_attrs) for t in study.get_trials()] == [
        (TrialState.COMPLETE, [0.0], {"epochs": 0}),
        (TrialState.FAIL, None, {}),
        (TrialState.COMPLETE, [2.0], {"epochs": 2}),
    ]


def test_record_heartbeats_writes_what_optunas_record_heartbeat_writes(database_url):
    from optuna.storages._rdb.models import TrialHeartbeatModel as Beat

    rdb = optuna_storage(database_url)
    study = optuna.create_study(storage=rdb)
    old, new, reference, silent = (study.ask()._trial_id for _ in range(4))
    for trial_id in (old, reference):
        rdb.record_heartbeat(trial_id)
    with rdb.scoped_session() as session:  # the old trial's last beat, a minute ago
        session.query(Beat).filter_by(trial_id=old).one().heartbeat -= datetime.timedelta(minutes=1)
        session.commit()

    record_heartbeats(rdb, [new, old, new])  # a new beat, and a beat again
    rdb.record_heartbeat(reference)  # Optuna's beat again, now
    record_heartbeats(rdb, [])
    with rdb.scoped_session() as session:
        beats: dict = {beat.trial_id: beat.heartbeat for beat in session.query(Beat)}
    assert set(beats) == {old, new, reference} and silent not in beats
    for trial_id in (old, new):
        assert abs(beats[trial_id] - beats[reference]) < datetime.timedelta(seconds=5)


def test_a_running_trial_that_never_got_a_heartbeat_is_failed_once_its_grace_is_over(
    database_url,
):
    """A worker that died between asking for a trial and its first heartbeat: Optuna's own
    reaper never looks at such a trial; ours fails it and runs it again."""
    from optuna.storages._rdb.models import TrialModel

    study = optuna.create_study(storage=optuna_storage(database_url))
    orphan, _ = study.ask(), study.ask()  # the second one starts now
    orphan.suggest_float("x", 0.0, 1.0)
    rdb = optuna_storage(database_url)
    with rdb.scoped_session() as session:  # as if it started a grace period and more ago
        row = session.get_one(TrialModel, orphan._trial_id)
        row.datetime_start = datetime.datetime.now() - datetime.timedelta(
            seconds=GRACE_PERIOD_S + 5
        )
        session.commit()

    assert fail_stale_trials(study) == 1
    trials = study.get_trials()
    assert [(t.state, t.user_attrs.get("reason")) for t in trials[:2]] == [
        (TrialState.FAIL, "stale"),
        (TrialState.RUNNING, None),
    ]
    (retry,) = trials[2:]
    assert retry.state == TrialState.WAITING and retry.params == orphan.params
