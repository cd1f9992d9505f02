"""Whole searches driven in this process (`caviar run`) on a real SQLite file: stages, budgets,
divergence, final test figures."""

import math

import optuna
import pytest
from optuna.trial import TrialState

from caviar.db.migrate import upgrade
from caviar.db.storage import optuna_storage, retry_stale_trial
from caviar.search.runner import finish_search, load_search_dataset, run_search, start_search
from caviar.search.spec import parse_spec

TINY = """
name: tiny
dataset: {name: synthetic, samples: 400, features: 6, classes: 3}
budget: {trials: 8, epochs: 4}
seed: 3
space:
  learning_rate: {low: 1.0e-3, high: 0.3, scale: log}
  momentum: {low: 0.9, high: 0.999, scale: one_minus_log}
  hidden_units: {low: 8, high: 16, type: int}
fixed: {optimizer: momentum, batch_size: 32, hidden_layers: 1}
"""


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    upgrade(url)
    return url


@pytest.fixture
def storage(url):
    return optuna_storage(url)


def run(url, spec, **options):
    """Run `spec` as `caviar run` does: a stored search, driven in this process."""
    return run_search(url, start_search(url, spec), **options)


def all_trials(storage, result):
    return [
        t
        for name in result.studies
        for t in optuna.load_study(study_name=name, storage=storage).get_trials()
    ]


def test_search_runs_exactly_its_budget_and_tests_the_best_once(url, storage):
    result = run(url, parse_spec(TINY), batch=3)
    trials = all_trials(storage, result)
    assert len(trials) == 8
    assert result.counts["complete"] + result.counts["failed"] + result.counts["pruned"] == 8
    best = result.best
    assert 0 <= best["test_accuracy"] <= 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert best["dev_accuracy"] == max(t.value for t in complete)
    best_trial = next(t for t in trials if t.number == best["trial"])
    assert best_trial.user_attrs["test_accuracy"] == best["test_accuracy"]
    assert "error" in best_trial.user_attrs["diagnosis"]
    study = optuna.load_study(study_name=best["study"], storage=storage)
    assert study.user_attrs["test_accuracy"] == best["test_accuracy"]


def test_beta_is_sampled_as_one_minus_beta_and_stored_both_ways(url, storage):
    result = run(url, parse_spec(TINY), batch=8)
    for trial in all_trials(storage, result):
        assert "one_minus_momentum" in trial.params
        assert trial.distributions["one_minus_momentum"].log
        assert trial.user_attrs["momentum"] == pytest.approx(1 - trial.params["one_minus_momentum"])
        assert trial.user_attrs["stage"] == 1


def test_coarse_to_fine_stages_are_separate_studies_with_narrowed_ranges(url, storage):
    spec = parse_spec(
        TINY.replace(
            "seed: 3", "seed: 3\nstages: [{trials: 5}, {trials: 3, keep_top: 0.4, margin: 0.05}]"
        )
    )
    result = run(url, spec, batch=4)
    assert [s.split("/")[-1] for s in result.studies] == ["stage-1", "stage-2"]
    first, second = (optuna.load_study(study_name=n, storage=storage) for n in result.studies)
    assert (first.user_attrs["stage"], second.user_attrs["stage"]) == (1, 2)
    assert len(first.trials) == 5 and len(second.trials) == 3
    wide, narrow = first.user_attrs["ranges"], second.user_attrs["ranges"]
    for name in ("learning_rate", "momentum"):
        assert wide[name]["low"] <= narrow[name]["low"] < narrow[name]["high"] <= wide[name]["high"]
    narrowed_lr = math.log(narrow["learning_rate"]["high"] / narrow["learning_rate"]["low"])
    assert narrowed_lr < math.log(wide["learning_rate"]["high"] / wide["learning_rate"]["low"])
    for trial in second.trials:
        lr = trial.params["learning_rate"]
        assert narrow["learning_rate"]["low"] <= lr <= narrow["learning_rate"]["high"]
        assert trial.user_attrs["stage"] == 2


def test_diverging_trials_fail_with_their_reason_and_the_search_goes_on(url, storage):
    spec = parse_spec(
        TINY.replace(
            "{low: 1.0e-3, high: 0.3, scale: log}", "{low: 1.0e-2, high: 1.0e4, scale: log}"
        )
    )
    result = run(url, spec, batch=8)
    trials = all_trials(storage, result)
    diverged = [t for t in trials if t.state == TrialState.FAIL]
    assert diverged, "learning rates up to 1e4 should diverge"
    assert all(t.user_attrs["reason"] == "diverged" for t in diverged)
    assert len(trials) == 8
    assert result.best is not None
    assert result.best["trial"] not in {t.number for t in diverged}


def test_regression_search_reports_test_mse_and_r2(url, storage):
    spec = parse_spec("""
name: reg
dataset: {name: synthetic, task: regression, samples: 400, features: 4}
budget: {trials: 3, epochs: 5}
space: {learning_rate: {low: 1.0e-3, high: 1.0e-1, scale: log}}
fixed: {optimizer: adam, batch_size: 32, hidden_units: 16}
final_fit: train_dev
""")
    result = run(url, spec)
    assert set(result.best) >= {"dev_mse", "test_mse", "test_r2"}
    assert "dev" not in result.best["diagnosis"]  # refit on train+dev: test is the held-out split


def test_median_pruner_prunes_inside_a_batch(url, storage):
    spec = parse_spec(
        TINY.replace(
            "budget: {trials: 8, epochs: 4}",
            "budget: {trials: 16, epochs: 6}\npruner: {name: median, warmup_epochs: 1}",
        )
    )
    result = run(url, spec, batch=16)
    assert result.counts["pruned"] > 0
    pruned = [t for t in all_trials(storage, result) if t.state == TrialState.PRUNED]
    assert all(t.user_attrs["epochs"] < 6 for t in pruned)


def test_the_best_trial_is_tested_with_its_own_weights_and_a_refit_reproduces_it(url, storage):
    spec = parse_spec(TINY)
    result = run(url, spec, batch=8)
    assert result.final is not None
    assert result.final.figures["dev_accuracy"] == result.best["dev_accuracy"]

    dataset = load_search_dataset(spec)  # a pool worker that did not train the best trial
    refit = finish_search(spec, storage, result.search_id, dataset, stage_count=1)
    dev_examples = len(dataset.y_dev)
    assert refit.final is not None
    assert refit.final.figures["dev_accuracy"] == pytest.approx(
        result.best["dev_accuracy"], abs=1.5 / dev_examples
    )


def test_a_stop_after_the_last_epoch_keeps_the_finished_batch(url, storage):
    one_shape = TINY.replace("  hidden_units: {low: 8, high: 16, type: int}\n", "").replace(
        "hidden_layers: 1", "hidden_layers: 1, hidden_units: 8"
    )
    epochs_trained: list[list[optuna.trial.Trial]] = []

    def timeout_after_first_batch():
        return "timeout" if len(epochs_trained) >= 4 else None

    result = run(
        url,
        parse_spec(one_shape),
        batch=4,
        should_stop=timeout_after_first_batch,
        on_epoch=epochs_trained.append,
    )
    trials = all_trials(storage, result)
    assert len(trials) == 4  # the search stopped before asking the next batch
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert result.best is not None


def test_a_trial_the_reaper_fails_in_its_last_round_runs_again_and_the_round_goes_on(url, storage):
    """The reaper fails a trial of this process (as when its heartbeats stopped) just before
    the round in which it would complete is told: its neighbours are told as usual, it keeps
    the reaper's reason, and its retry completes in its place."""
    reaped: list[int] = []

    def reap_one(trials):
        for trial in trials:
            if not reaped and max(trial._cached_frozen_trial.intermediate_values) == 4:
                study = trial.study
                study.tell(trial, state=TrialState.FAIL)
                retry_stale_trial(study, study._storage.get_trial(trial._trial_id))
                reaped.append(trial.number)

    result = run(url, parse_spec(TINY), batch=3, on_epoch=reap_one)
    trials = all_trials(storage, result)
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == reaped[0] and failed.user_attrs["reason"] == "stale"
    assert result.counts["complete"] == 8  # the budget, the retry included
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
