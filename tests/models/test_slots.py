"""Slot refill is exact: a trial that takes a freed slot trains as it would alone, and the other
slots' trials are untouched, whatever the program's round when it came in."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from caviar.models.data import load_dataset
from caviar.models.train import Bucket, Shape, TrainData, train_batch

EPOCHS = 5


def _shape(hidden, optimizer="adam", dropout=False) -> Shape:
    return Shape(8, 3, hidden, "relu", False, optimizer, 32, use_dropout=dropout)


FIRST: list[tuple[Shape, dict[str, Any]]] = [
    (_shape((16, 12)), {"learning_rate": 1e-2, "seed": 0}),
    (_shape((24,), "momentum", dropout=True), {"learning_rate": 0.1, "dropout": 0.2, "seed": 1}),
    (_shape((9, 20)), {"learning_rate": 3e-3, "lr_decay": "exponential", "seed": 2}),
]
LATER: list[tuple[Shape, dict[str, Any]]] = [
    (_shape((20, 6), dropout=True), {"learning_rate": 2e-2, "dropout": 0.1, "seed": 3}),
    (
        _shape((12,), "momentum"),
        {"learning_rate": 0.05, "lr_decay": "step", "decay_rate": 0.5, "seed": 4},
    ),
    (_shape((24, 20)), {"learning_rate": 1e-3, "lr_decay": "inverse_time", "seed": 5}),
]
BUCKET = Bucket.envelope([shape for shape, _ in FIRST + LATER])


@pytest.fixture(scope="module")
def data():
    ds = load_dataset({"name": "synthetic", "samples": 600, "features": 8, "classes": 3}, seed=4)
    return TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)


@pytest.fixture(scope="module", params=[False, True], ids=["lockstep", "ahead"])
def streamed(data, request):
    """Three slots; trial 0 is stopped after 2 epochs, trial 2 after 3; each freed slot is refilled
    from LATER at once, so the newcomers start at rounds 3 and 4 of the program (a round later
    when rounds are dispatched ahead)."""
    return stream(data, ahead=request.param)


def stream(data, *, ahead: bool, keep_best: bool = True):
    later = list(LATER)
    asked = []

    def refill(free: int):
        asked.append(free)
        taken, later[:] = later[:free], later[free:]
        return taken

    def stop(report):
        mask = np.zeros(report.epochs.size, bool)
        mask[0] = report.epochs[0] == 2
        mask[2] = report.epochs[2] == 3
        return mask

    result = train_batch(
        [s for s, _ in FIRST],
        [h for _, h in FIRST],
        data,
        epochs=EPOCHS,
        callback=stop,
        refill=refill,
        slots=3,
        group_size=4,
        data_seed=7,
        bucket=BUCKET,
        ahead=ahead,
        keep_best=keep_best,
    )
    return result, asked


def alone(data, shape, hparams, epochs=EPOCHS):
    return train_batch(shape, [hparams], data, epochs=epochs, data_seed=7).trials[0]


def test_a_refilled_slot_trains_its_trial_as_it_would_train_alone(data, streamed):
    result, _ = streamed
    assert [t.status for t in result.trials] == ["stopped", "completed", "stopped"] + [
        "completed"
    ] * 3
    for index, (shape, hparams) in enumerate(FIRST + LATER):
        mine, reference = result.trials[index], alone(data, shape, hparams)
        epochs = mine.epochs
        assert epochs == (2, EPOCHS, 3, EPOCHS, EPOCHS, EPOCHS)[index]
        for got, want in zip(mine.history, reference.history[:epochs], strict=True):
            for name in ("train_loss", "dev_loss", "dev_accuracy"):
                np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6)
        if epochs == EPOCHS:  # best-epoch records follow the trial's own epochs
            assert mine.best_epoch == reference.best_epoch
            np.testing.assert_allclose(
                mine.best["dev_loss"], reference.best["dev_loss"], rtol=2e-5, atol=1e-6
            )


def test_refill_is_asked_for_the_free_slots_and_ends_when_it_has_none(streamed):
    result, asked = streamed
    # Trial 0 stops at round 2 (one slot free), trial 2 at round 3, then trial 1 and the
    # newcomers complete; an empty answer ends the refills.
    assert asked[:2] == [1, 1] and asked[2] >= 1
    assert len(result.trials) == len(FIRST) + len(LATER)
    assert 0.5 < result.occupancy <= 1.0


def test_rounds_dispatched_ahead_train_every_trial_as_in_lockstep(data):
    """A stopped trial trains one more (discarded) round when rounds are dispatched ahead; its
    record and its weights are those of the round it was stopped after."""
    (lockstep, asked), (ahead, asked_ahead) = (
        stream(data, ahead=flag, keep_best=False) for flag in (False, True)
    )
    assert asked_ahead == asked
    assert [t.status for t in ahead.trials] == [t.status for t in lockstep.trials]
    for index, (mine, reference) in enumerate(zip(ahead.trials, lockstep.trials, strict=True)):
        assert mine.epochs == reference.epochs
        assert mine.best_epoch == reference.best_epoch
        np.testing.assert_allclose(
            [h["dev_loss"] for h in mine.history],
            [h["dev_loss"] for h in reference.history],
            rtol=2e-5,
            atol=1e-6,
        )
        for got, want in zip(
            jax.tree_util.tree_leaves(ahead.trial_variables(index)),
            jax.tree_util.tree_leaves(lockstep.trial_variables(index)),
            strict=True,
        ):  # the last epoch's weights: a stopped trial's extra round left no trace
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # The two stopped trials' extra rounds ran as padding, and their slots came free later.
    assert ahead.occupancy < lockstep.occupancy


def test_trials_beyond_the_slots_wait_for_one_and_train_as_alone(data):
    shapes, hparams = [s for s, _ in FIRST + LATER], [h for _, h in FIRST + LATER]
    queued = train_batch(shapes, hparams, data, epochs=3, slots=2, data_seed=7, bucket=BUCKET)
    for index, trial in enumerate(queued.trials):
        reference = alone(data, shapes[index], hparams[index], epochs=3)
        np.testing.assert_allclose(
            [h["dev_loss"] for h in trial.history],
            [h["dev_loss"] for h in reference.history],
            rtol=2e-5,
            atol=1e-6,
        )
    assert queued.occupancy == pytest.approx(1.0)  # the two slots always held a live trial


def test_a_trial_that_does_not_fit_the_bucket_is_refused(data):
    too_wide = [(_shape((64,)), {"seed": 9})]
    with pytest.raises(ValueError, match="does not fit"):
        train_batch(
            FIRST[0][0], [FIRST[0][1]], data, epochs=2, refill=lambda n: too_wide, bucket=BUCKET
        )


def test_trials_leaving_in_one_round_are_told_together_with_their_own_weights(data):
    told: list[list[tuple[int, str, int]]] = []
    weights = {}

    def on_end(ended):
        told.append([(e.trial, e.result.status, e.result.epochs) for e in ended])
        weights.update({e.trial: e.variables() for e in ended})

    def stop(report):  # trials 0 and 2 are stopped after the same round
        return (report.epochs == 2) & (np.arange(report.epochs.size) != 1)

    shapes, hparams = [s for s, _ in FIRST], [h for _, h in FIRST]
    result = train_batch(
        shapes,
        hparams,
        data,
        epochs=3,
        callback=stop,
        on_end=on_end,
        data_seed=7,
        bucket=BUCKET,
        keep_best=False,
    )
    assert told == [[(0, "stopped", 2), (2, "stopped", 2)], [(1, "completed", 3)]]
    assert result.kept == [({}, {})] * 3  # told trials' weights went to `on_end` alone
    for index in (0, 2):  # each its own real shape, as after its last epoch alone
        reference = train_batch(
            shapes[index], [hparams[index]], data, epochs=2, data_seed=7, keep_best=False
        )
        for got, want in zip(
            jax.tree_util.tree_leaves(weights[index]),
            jax.tree_util.tree_leaves(reference.trial_variables(0)),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
