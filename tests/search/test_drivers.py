"""One driver, two ways to drive it: every behaviour of a search is the same whether `caviar run`
drives it in its own process (`search.runner.run_search`) or a pool worker does, under the
search's row lock (`search.worker.Worker`). Each test runs both, on a real SQLite file."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from caviar.db.migrate import upgrade
from caviar.db.session import session_scope
from caviar.db.storage import optuna_storage
from caviar.db.tables import Search
from caviar.search import final
from caviar.search import trials as trial_training
from caviar.search.runner import run_search, start_search
from caviar.search.spec import SpecError, parse_spec
from caviar.search.worker import Worker
from caviar.service.searches import submit_search

SPEC = """
name: drivers
dataset: {name: synthetic, samples: 400, features: 6, classes: 3}
budget: {trials: 4, epochs: 3}
space:
  learning_rate: {low: 1.0e-3, high: 0.3, scale: log}
fixed: {optimizer: adam, batch_size: 32, hidden_units: 8, hidden_layers: 1}
"""

DRIVERS = ["caviar run", "caviar worker"]


@pytest.fixture
def url(tmp_path):
    url = f"sqlite:///{tmp_path / 'caviar.db'}"
    upgrade(url)
    return url


def drive(driver: str, url: str, text: str, batch: int) -> Search:
    """Run the search of spec `text` to its end with `driver`; its row afterwards."""
    spec = parse_spec(text)
    if driver == "caviar run":
        search_id = start_search(url, spec)
        run_search(url, search_id, batch=batch)
    else:
        with session_scope(url) as session:  # as the API queues it
            search, _ = submit_search(
                session, "alice", spec, idempotency_key=None, max_concurrent=10
            )
            search_id = search.id
        Worker(url, batch=batch).run(until_idle=True)
    with session_scope(url) as session:
        return session.get_one(Search, search_id)


def trials_of(url: str, search: Search) -> list[optuna.trial.FrozenTrial]:
    storage = optuna_storage(url)  # cached: one pool for the test's reads
    return [
        t
        for name in search.studies
        for t in optuna.load_study(study_name=name, storage=storage).trials
    ]


def watch_programs(
    monkeypatch, fail_above: int | None = None, refills: list[bool] | None = None
) -> list[int]:
    """The trials each engine call starts with, as the drivers make them; with `fail_above`, a
    call starting with more runs out of memory; `refills` gets whether each call may take new
    trials into its slots."""
    sizes: list[int] = []
    train = trial_training.train_buckets

    def watched(lanes, *args, **kwargs):
        sizes.append(sum(len(lane.hparams) for lane in lanes))
        if refills is not None:
            refills.append(any(lane.refill is not None for lane in lanes))
        assert len(sizes) < 10, f"the driver keeps asking for more than fits: {sizes}"
        if fail_above is not None and sizes[-1] > fail_above:
            raise MemoryError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return train(lanes, *args, **kwargs)

    monkeypatch.setattr(trial_training, "train_buckets", watched)
    return sizes


@pytest.mark.parametrize(("batch", "refilled"), [(4, [False]), (2, [True])])
@pytest.mark.parametrize("driver", DRIVERS)
def test_only_a_claim_that_leaves_budget_takes_new_trials_into_its_slots(
    driver, url, monkeypatch, batch, refilled
):
    """A claim of the stage's last trials prepares nothing for new ones (no slot programs are
    compiled ahead for them); one that leaves budget takes new trials as its slots empty."""
    calls: list[bool] = []
    watch_programs(monkeypatch, refills=calls)
    done = drive(driver, url, SPEC, batch=batch)  # a budget of 4 trials
    assert done.status == "completed", done.error
    assert len(trials_of(url, done)) == 4
    assert calls == refilled


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_timeout_stops_trials_in_the_middle_of_training(driver, url):
    slow = (
        SPEC.replace("epochs: 3}", "epochs: 1000, timeout_s: 2}")
        .replace("samples: 400", "samples: 4000")
        .replace("batch_size: 32", "batch_size: 8")
    )
    search = drive(driver, url, slow, batch=2)
    trials = trials_of(url, search)
    assert len(trials) == 2, "no trial starts once the time is up"
    assert [t.user_attrs["reason"] for t in trials] == ["timeout"] * 2
    assert all(t.user_attrs["epochs"] < 1000 for t in trials)
    assert (search.status, search.error) == ("failed", "no trial completed")


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_final_fit_tests_the_weights_the_process_trained(driver, url, monkeypatch):
    refits: list[int] = []
    train = final.train_batch

    def counted_train(*a, **k):
        refits.append(1)
        return train(*a, **k)

    monkeypatch.setattr(final, "train_batch", counted_train)
    done = drive(driver, url, SPEC, batch=4)
    assert done.status == "completed", done.error
    assert refits == [], "the best trial was trained again for the final fit"
    assert done.best is not None
    best = next(t for t in trials_of(url, done) if t.number == done.best["trial"])
    assert best.user_attrs["final_figures"]["dev_accuracy"] == done.best["dev_accuracy"]


@pytest.mark.parametrize("driver", DRIVERS)
def test_running_out_of_memory_halves_the_batch_and_keeps_the_budget(driver, url, monkeypatch):
    sizes = watch_programs(monkeypatch, fail_above=2)
    done = drive(driver, url, SPEC, batch=4)
    # Two slots after the failure: the retried trials come two at once and the last two take
    # the slots the first two leave (one stream).
    assert sizes == [4, 2]
    trials = trials_of(url, done)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.user_attrs["reason"] for t in failed] == ["oom"] * 4
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and done.status == "completed"
    assert sorted(t.params["learning_rate"] for t in complete) == sorted(
        t.params["learning_rate"] for t in failed
    )  # the same trials, run again


def test_a_task_that_conflicts_with_the_dataset_is_the_same_error_for_both(url):
    conflicting = SPEC.replace("classes: 3}", "task: regression}\ntask: classification")
    message = "task: task classification conflicts with dataset.task regression; give one"
    with pytest.raises(SpecError) as refused:  # caviar run, and the API, refuse the spec
        parse_spec(conflicting)
    assert str(refused.value) == message
    # A worker given it anyway (stored unchecked, as an older Caviar may have) fails the search.
    spec = parse_spec(SPEC).model_dump(mode="json", exclude_none=True)
    spec["task"], spec["dataset"]["task"] = "classification", "regression"
    del spec["dataset"]["classes"]
    with session_scope(url) as session:
        session.add(Search(id="conflict", owner="alice", name="conflict", spec=spec))
    Worker(url).run(until_idle=True)
    with session_scope(url) as session:
        search = session.get_one(Search, "conflict")
        assert (search.status, search.error) == ("failed", f"could not load the dataset: {message}")


ASHA = (
    SPEC.replace("trials: 4, epochs: 3", "trials: 12, epochs: 9")
    + "pruner: {name: asha, min_epochs: 1, reduction_factor: 3}\n"
    + "stages: [{trials: 8}, {trials: 4}]\n"
)


@pytest.mark.parametrize("ahead", ["0", "1"], ids=["lockstep", "dispatched ahead"])
@pytest.mark.parametrize("driver", DRIVERS)
def test_asha_frees_slots_that_new_trials_take_and_the_budget_is_exact(
    driver, url, monkeypatch, ahead
):
    monkeypatch.setenv("CAVIAR_DISPATCH_AHEAD", ahead)
    calls = watch_programs(monkeypatch)
    done = drive(driver, url, ASHA, batch=4)
    assert done.status == "completed", done.error
    trials = trials_of(url, done)
    by_stage = [[t for t in trials if t.user_attrs["stage"] == s] for s in (1, 2)]
    assert [len(stage) for stage in by_stage] == [8, 4]  # exactly the budget, stage by stage
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs["epochs"] < 9 for t in pruned)
    # Stage 1's 8 trials came four at once into one program: the later ones took freed slots.
    assert calls[0] == 4 and len(calls) == 2, calls
    for trial in trials:  # each trial reported its own epochs, from 1
        assert sorted(trial.intermediate_values) == list(range(1, trial.user_attrs["epochs"] + 1))


TRIAL_EPOCHS = SPEC.replace("trials: 4, epochs: 3", "trial_epochs: 40, epochs: 9") + (
    "pruner: {name: asha, min_epochs: 1, reduction_factor: 3}\n"
)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_trial_epoch_budget_ends_within_one_trial_of_it(driver, url):
    """With `budget.trial_epochs`, pruning buys trials: the search trains until no full trial
    fits in what is left, and never trains more than its budget."""
    done = drive(driver, url, TRIAL_EPOCHS, batch=4)
    assert done.status == "completed", done.error
    trials = trials_of(url, done)
    spent = sum(t.user_attrs["epochs"] for t in trials)
    assert 40 - 9 < spent <= 40, spent
    assert any(t.state == TrialState.PRUNED for t in trials)
    assert len(trials) > 40 // 9, "pruned trials' epochs went to more trials"


MIXED_ASHA = (
    SPEC.replace("trials: 4, epochs: 3", "trials: 24, epochs: 9")
    .replace("hidden_units: 8, hidden_layers: 1", "hidden_layers: 1")
    .replace("scale: log}\n", "scale: log}\n  hidden_units: {choices: [4, 16, 64]}\n")
    + "pruner: {name: asha, min_epochs: 1, reduction_factor: 3}\n"
)


@pytest.mark.parametrize("driver", DRIVERS)
def test_new_trials_that_fit_no_bucket_in_training_get_one_and_none_is_lost(
    driver, url, monkeypatch
):
    """With one bucket per width, a freed slot's new trial often fits only another bucket: it
    takes a free slot of one it fits or waits for a bucket of its own, which joins the loop;
    every trial asked trains in exactly one bucket and is told, and the budget is exact."""
    monkeypatch.setenv("CAVIAR_BUCKETS", "exact")
    lanes: list[list[int]] = []  # per lane: the numbers of its trials, as the engine returns
    train = trial_training.train_buckets

    def watched(given, data, *, more, **kwargs):
        added: list = []

        def watched_more(training: bool):
            new = more(training)
            added.extend(new)
            return new

        results = train(given, data, more=watched_more, **kwargs)
        lanes.extend([len(r.trials)] for r in results)
        assert len(results) == len(given) + len(added)
        return results

    monkeypatch.setattr(trial_training, "train_buckets", watched)
    done = drive(driver, url, MIXED_ASHA, batch=4)
    assert done.status == "completed", done.error
    trials = trials_of(url, done)
    assert len(trials) == 24 and {t.state for t in trials} <= {
        TrialState.COMPLETE,
        TrialState.PRUNED,
    }
    assert sum(count for (count,) in lanes) == 24, "each trial trained in exactly one lane"
    assert len(lanes) > 2, "trials that fit no bucket in training got buckets of their own"
