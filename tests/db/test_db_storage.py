"""Writes into Optuna's tables that Optuna's public API makes one commit at a time."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from caviar.db.storage import (
    TrialTally,
    create_trial,
    optuna_storage,
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


def test_create_trial_is_the_next_trial_ask_would_give(database_url):
    study = optuna.create_study(storage=optuna_storage(database_url))
    first = study.ask()
    created = create_trial(study)
    assert created.number == first.number + 1
    assert created.suggest_float("x", 0.0, 1.0) == study.get_trials()[1].params["x"]
    study.tell(created, 0.25)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.COMPLETE]
