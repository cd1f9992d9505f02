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


def play(
    path: Path, pruner: str, by_round: bool, seed: int, workers: int = 1
) -> list[tuple[int, int, str, dict]]:
    """A stream of trials on a real SQLite study: 4 train at once, each reports its own epoch
    every round, a pruned or finished trial's place goes to a new one; with `workers`, trials are
    asked in turn through that many handles of the study (each its own storage, as separate
    processes have), which decide for their own trials one after another each round.
    (trial, epochs, state, the system attributes stored for it) as the trials end."""
    url = f"sqlite:///{path}"
    optuna.create_study(storage=url, study_name="round", direction="maximize")
    studies = [
        optuna.load_study(
            study_name="round", storage=optuna.storages.RDBStorage(url), pruner=PRUNERS[pruner]()
        )
        for _ in range(workers)
    ]
    rng = random.Random(seed)
    rounds = [RoundPruner(study) for study in studies]
    running: list[tuple[int, optuna.trial.Trial, float]] = []
    ended, started = [], 0
    while started < 14 or running:
        while len(running) < 4 and started < 14:
            worker = started % workers
            running.append((worker, studies[worker].ask(), rng.random()))
            started += 1
        for _, trial, skill in running:
            epoch = len(trial._cached_frozen_trial.intermediate_values) + 1
            trial.report(skill * (1 - 0.5**epoch) + rng.gauss(0, 0.01), epoch)
        decisions: dict[int, bool] = {}
        for worker in range(workers):
            trials = [trial for w, trial, _ in running if w == worker]
            pruned = (
                rounds[worker].decide(trials) if by_round else [t.should_prune() for t in trials]
            )
            decisions.update(zip([t.number for t in trials], pruned, strict=True))
        still = []
        for worker, trial, skill in running:
            epochs = len(trial._cached_frozen_trial.intermediate_values)
            if decisions[trial.number] or epochs == 9:
                state = TrialState.PRUNED if decisions[trial.number] else TrialState.COMPLETE
                studies[worker].tell(
                    trial, None if state == TrialState.PRUNED else skill, state=state
                )
                ended.append((trial.number, epochs, state.name))
            else:
                still.append((worker, trial, skill))
        running = still
    stored = optuna.load_study(study_name="round", storage=url).trials
    return [(*end, stored[end[0]].system_attrs) for end in ended]


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize(("seed", "workers"), [(0, 1), (1, 1), (2, 1), (0, 2), (1, 2)])
def test_a_round_pruned_at_once_ends_every_trial_as_trial_by_trial(tmp_path, pruner, seed, workers):
    """Also with two workers, each seeing the other's rungs only through the database."""
    one_by_one = play(tmp_path / "a.db", pruner, by_round=False, seed=seed, workers=workers)
    by_round = play(tmp_path / "b.db", pruner, by_round=True, seed=seed, workers=workers)
    assert by_round == one_by_one  # the same decisions, and the same rungs in the database
    assert any(state == "PRUNED" for _, _, state, _ in by_round), "the pruner never pruned"
    if pruner == "asha":
        assert any("completed_rung_1" in attrs for *_, attrs in by_round)


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
