"""Pruning by rounds decides exactly what Optuna's `should_prune` decides trial by trial; the
planner expects the epochs the pruner leaves a trial."""

from __future__ import annotations

import json
import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from caviar.search.pruning import RoundPruner
from caviar.search.spec import parse_spec
from caviar.search.studies import expected_epochs

PRUNERS = {
    "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9),
}


def play(path: Path, pruner: str, by_round: bool, seed: int) -> list[tuple[int, int, str]]:
    """A stream of trials on a real SQLite study: 4 train at once, each reports its own epoch
    every round, a pruned or finished trial's place goes to a new one; (trial, epochs, state)."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    study = optuna.create_study(
        storage=storage, study_name="round", pruner=PRUNERS[pruner](), direction="maximize"
    )
    rng = random.Random(seed)
    rounds = RoundPruner(study)
    running: list[tuple[optuna.trial.Trial, float]] = []
    ended, started = [], 0
    while started < 14 or running:
        while len(running) < 4 and started < 14:
            running.append((study.ask(), rng.random()))
            started += 1
        for trial, skill in running:
            epoch = len(trial._cached_frozen_trial.intermediate_values) + 1
            trial.report(skill * (1 - 0.5**epoch) + rng.gauss(0, 0.01), epoch)
        trials = [trial for trial, _ in running]
        decisions = rounds.decide(trials) if by_round else [t.should_prune() for t in trials]
        still = []
        for (trial, skill), prune in zip(running, decisions, strict=True):
            epochs = len(trial._cached_frozen_trial.intermediate_values)
            if prune or epochs == 9:
                state = TrialState.PRUNED if prune else TrialState.COMPLETE
                study.tell(trial, None if prune else skill, state=state)
                ended.append((trial.number, epochs, state.name))
            else:
                still.append((trial, skill))
        running = still
    return ended


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_round_pruned_at_once_ends_every_trial_as_trial_by_trial(tmp_path, pruner, seed):
    one_by_one = play(tmp_path / "a.db", pruner, by_round=False, seed=seed)
    by_round = play(tmp_path / "b.db", pruner, by_round=True, seed=seed)
    assert by_round == one_by_one
    assert any(state == "PRUNED" for _, _, state in by_round), "the pruner never pruned"


@pytest.mark.parametrize(
    ("pruner", "expected"),
    [
        # every trial to 1 epoch, a third on to 3, a ninth to 9, a 27th to 20
        ({"name": "asha", "min_epochs": 1, "reduction_factor": 3}, 1 + 2 / 3 + 6 / 9 + 11 / 27),
        ({"name": "asha", "min_epochs": 5, "reduction_factor": 2}, 5 + 5 / 2 + 10 / 4),
        ({"name": "median"}, 20),
        ({"name": "none"}, 20),
    ],
)
def test_the_planner_expects_the_epochs_the_pruner_leaves(pruner, expected):
    spec = parse_spec(
        "name: e\ndataset: {name: digits}\nbudget: {trials: 8, epochs: 20}\n"
        "space: {learning_rate: {low: 1.0e-3, high: 0.1, scale: log}}\n"
        f"pruner: {json.dumps(pruner)}\n"
    )
    assert expected_epochs(spec) == pytest.approx(expected)
