"""Several buckets in one round loop (`train_buckets`) train every trial as it trains alone:
lanes side by side, a refill a lane takes, and a lane added while the others train."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from caviar.models.data import load_dataset
from caviar.models.executables import compile_count
from caviar.models.train import (
    Bucket,
    EpochReport,
    Lane,
    Shape,
    TrainData,
    TrialResult,
    compile_ahead,
    train_batch,
    train_buckets,
)

EPOCHS = 4


def _shape(hidden, optimizer="adam") -> Shape:
    return Shape(8, 3, hidden, "relu", False, optimizer, 32)


Trials = list[tuple[Shape, dict[str, Any]]]

WIDE: Trials = [
    (_shape((24, 20)), {"learning_rate": 1e-2, "seed": 0}),
    (_shape((16,), "momentum"), {"learning_rate": 0.1, "seed": 1}),
]
NARROW: Trials = [
    (_shape((6,)), {"learning_rate": 3e-2, "lr_decay": "exponential", "seed": 2}),
    (_shape((4, 5), "momentum"), {"learning_rate": 0.05, "seed": 3}),
]
LATE: Trials = [(_shape((7,)), {"learning_rate": 2e-2, "seed": 4})]
REFILL: Trials = [(_shape((20, 8)), {"learning_rate": 5e-3, "seed": 5})]


@pytest.fixture(scope="module")
def data():
    ds = load_dataset({"name": "synthetic", "samples": 600, "features": 8, "classes": 3}, seed=4)
    return TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)


def alone(data, shape: Shape, hparams: dict[str, Any]) -> TrialResult:
    return train_batch(shape, [hparams], data, epochs=EPOCHS, data_seed=7).trials[0]


def lane(trials, bucket: Bucket, **callbacks) -> Lane:
    return Lane([s for s, _ in trials], [h for _, h in trials], bucket, **callbacks)


def assert_trained_alone(data, got: TrialResult, shape: Shape, hparams: dict[str, Any]) -> None:
    want = alone(data, shape, hparams)
    assert got.epochs == want.epochs == EPOCHS
    for mine, theirs in zip(got.history, want.history, strict=True):
        for name in ("train_loss", "dev_loss", "dev_accuracy"):
            np.testing.assert_allclose(mine[name], theirs[name], rtol=2e-5, atol=1e-6)
    assert got.best_epoch == want.best_epoch


@pytest.mark.parametrize("ahead", [False, True], ids=["lockstep", "ahead"])
def test_lanes_side_by_side_with_a_refill_and_a_late_lane_train_as_alone(data, ahead):
    """The wide lane stops trial 0 after round 2 and takes REFILL into its slot; after round 1
    a third lane (LATE) joins the two in training. Every trial trains as it would alone."""
    wide_bucket = Bucket.envelope([s for s, _ in WIDE + REFILL])
    narrow_bucket = Bucket.envelope([s for s, _ in NARROW])
    rounds: list[str] = []
    later = list(REFILL)

    def stop_first(report: EpochReport) -> np.ndarray:
        rounds.append("wide")
        mask = np.zeros(report.epochs.size, bool)
        mask[0] = report.epochs[0] == 2
        return mask

    def narrow_round(report: EpochReport) -> None:
        rounds.append("narrow")

    def refill(free: int):
        taken, later[:] = later[:free], later[free:]
        return taken

    def more(training: bool) -> list[Lane]:
        if "late" in rounds:
            return []
        assert training, "asked after the first round, while the lanes still train"
        rounds.append("late")
        return [lane(LATE, late_bucket)]

    late_bucket = Bucket.exact(LATE[0][0])
    for trials, bucket in ((NARROW, narrow_bucket), (LATE, late_bucket)):
        # compiled before: a lane whose program is not ready waits while another trains
        compiling = compile_ahead(
            [s for s, _ in trials],
            [h for _, h in trials],
            data,
            group_size=2,
            bucket=bucket,
            ahead=ahead,
        )
        if compiling is not None:
            compiling.result()

    results = train_buckets(
        [
            lane(WIDE, wide_bucket, callback=stop_first, refill=refill),
            lane(NARROW, narrow_bucket, callback=narrow_round),
        ],
        data,
        epochs=EPOCHS,
        more=more,
        data_seed=7,
        group_size=2,
        ahead=ahead,
    )
    wide, narrow, late = results
    assert rounds[:4] == ["wide", "narrow", "late", "wide"], "lanes report in turn, every round"
    assert [t.status for t in wide.trials] == ["stopped", "completed", "completed"]
    assert wide.trials[0].epochs == 2
    if not ahead:  # ahead, the stopped trial's slot trains one more (discarded) round
        # Two slots for six rounds; the refill took the freed slot at round 3 and trained
        # alone in rounds 5 and 6: 2 + 4 + 4 live slot-epochs of 12.
        assert wide.occupancy == pytest.approx(10 / 12)
    for got, (shape, hparams) in zip(wide.trials[1:], WIDE[1:] + REFILL, strict=True):
        assert_trained_alone(data, got, shape, hparams)
    for got, (shape, hparams) in zip(narrow.trials + late.trials, NARROW + LATE, strict=True):
        assert_trained_alone(data, got, shape, hparams)


def test_two_lanes_of_one_bucket_share_its_program(data):
    bucket = Bucket.envelope([s for s, _ in NARROW])
    before = compile_count()
    first, second = train_buckets(
        [lane(NARROW[:1], bucket), lane(NARROW[1:], bucket)],
        data,
        epochs=EPOCHS,
        data_seed=7,
        group_size=2,
    )
    assert compile_count() - before <= 1  # one program serves both lanes of the bucket
    for got, (shape, hparams) in zip(first.trials + second.trials, NARROW, strict=True):
        assert_trained_alone(data, got, shape, hparams)


def test_an_error_in_one_lane_ends_that_lane_alone(data):
    """A lane whose callback raises is told through `on_error` and leaves the loop; the other
    lane trains on as alone. A lane without `on_error` ends the loop with its error."""
    wide, narrow = Bucket.envelope([s for s, _ in WIDE]), Bucket.envelope([s for s, _ in NARROW])
    told: list[Exception] = []

    def broken(report: EpochReport) -> None:
        if report.round == 2:
            raise RuntimeError("a bug in the callback")

    failing, healthy = train_buckets(
        [
            lane(WIDE, wide, callback=broken, on_error=told.append),
            lane(NARROW, narrow),
        ],
        data,
        epochs=EPOCHS,
        data_seed=7,
        group_size=2,
    )
    assert [str(error) for error in told] == ["a bug in the callback"]
    assert [t.epochs for t in failing.trials] == [2, 2], "the lane left after its second round"
    for got, (shape, hparams) in zip(healthy.trials, NARROW, strict=True):
        assert_trained_alone(data, got, shape, hparams)
    with pytest.raises(RuntimeError, match="a bug in the callback"):
        train_buckets([lane(WIDE, wide, callback=broken)], data, epochs=EPOCHS, group_size=2)
