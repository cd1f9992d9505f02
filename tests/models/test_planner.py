"""The planner's choices on hand-made claims, and a later claim that compiles nothing."""

from __future__ import annotations

import pytest

from caviar.models.bucket import Bucket, Shape
from caviar.models.data import load_dataset
from caviar.models.planner import STRATEGIES, Costs, plan
from caviar.models.train import TrainData, compile_count, compiled_buckets, train_batch


def shape(*hidden: int, optimizer: str = "momentum", batch_size: int = 32) -> Shape:
    return Shape(8, 3, hidden, optimizer=optimizer, batch_size=batch_size)


def costs(compile_s: float, load_s: float = 0.0, group_size: int = 1) -> Costs:
    """Costs in which one trial of one hidden layer of width w takes w seconds to train."""
    per_unit = 3 * shape(1).forward_flops(32)  # FLOPs of one epoch per hidden unit
    return Costs(
        compile_s,
        load_s,
        per_unit,
        epochs=1,
        train_examples=32,
        dev_examples=0,
        group_size=group_size,
    )


SPREAD = [shape(w) for w in (32, 40, 50, 64, 128, 256, 512)]  # widths over a decade and more


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_shape_is_one_bucket_without_padding(strategy):
    chosen = plan([shape(64, 64)] * 5, costs(1e5), strategy=strategy)
    assert [a.members for a in chosen.assignments] == [(0, 1, 2, 3, 4)]
    assert chosen.assignments[0].bucket == Bucket.exact(shape(64, 64))
    assert chosen.waste == 1.0


def test_free_compiles_keep_every_shape_exact():
    chosen = plan(SPREAD, costs(0.0))
    assert len(chosen.assignments) == len(SPREAD) and chosen.waste == 1.0


def test_dear_compiles_put_a_decade_of_widths_in_one_bucket():
    chosen = plan(SPREAD, costs(1e6))
    assert len(chosen.assignments) == 1
    assert chosen.assignments[0].bucket.widths == (512,)
    assert chosen.waste == pytest.approx(7 * 512 / sum(s.hidden[0] for s in SPREAD))


def test_auto_merges_near_widths_only_and_beats_both_other_strategies():
    chosen = plan(SPREAD, costs(100.0))
    buckets = {SPREAD[i].hidden[0]: a.bucket for a in chosen.assignments for i in a.members}
    assert 1 < len(chosen.assignments) < len(SPREAD)
    assert buckets[32] == buckets[40] and buckets[32] != buckets[512]
    for other in ("exact", "single"):
        assert chosen.seconds < plan(SPREAD, costs(100.0), strategy=other).seconds


def test_mixed_depths_and_families_share_a_bucket_when_compiles_are_dear():
    claim = [shape(64), shape(64, 64), shape(64, 64, 64, optimizer="adam")]
    (only,) = plan(claim, costs(1e6)).assignments
    assert only.bucket.widths == (64, 64, 64) and only.bucket.min_depth == 1
    assert only.bucket.optimizers == ("momentum", "adam")
    assert only.members == (0, 1, 2)


def test_different_minibatch_sizes_never_share_a_bucket():
    claim = [shape(64), shape(64, batch_size=64), shape(32)]
    chosen = plan(claim, costs(1e6), strategy="single")
    assert sorted(a.members for a in chosen.assignments) == [(0, 2), (1,)]


def test_a_claim_that_fits_a_compiled_bucket_goes_there_at_no_compile_cost():
    compiled = Bucket.envelope([shape(128, 128), shape(16)])
    claim = [shape(100, 90), shape(50)]
    for strategy in ("auto", "single"):
        (only,) = plan(claim, costs(1e5), strategy=strategy, compiled=[compiled]).assignments
        assert only.bucket == compiled and only.compiled
        assert only.seconds == costs(1e5).seconds(compiled, 2, build_s=0.0)
    # Without the compiled bucket, auto compiles a smaller one instead.
    (fresh,) = plan(claim, costs(1e5)).assignments
    assert fresh.bucket.widths == (100, 90) and not fresh.compiled


def test_a_cached_bucket_costs_its_load_and_wins_over_a_new_compile():
    cached = Bucket.envelope([shape(128, 128), shape(16)])
    claim = [shape(100, 90), shape(50)]
    for strategy in ("auto", "single"):
        (only,) = plan(claim, costs(1e5, 10.0), strategy=strategy, cached=[cached]).assignments
        assert only.bucket == cached and only.cached and not only.compiled
        assert only.program == "cached"
        assert only.seconds == costs(1e5, 10.0).seconds(cached, 2, build_s=10.0)
    # A bucket compiled in this process costs nothing, even when it is in the cache as well.
    (only,) = plan(claim, costs(1e5, 10.0), compiled=[cached], cached=[cached]).assignments
    assert only.compiled and not only.cached and only.program == "compiled"
    # When loading costs as much as compiling, auto pads no more than a new compile would.
    (fresh,) = plan(claim, costs(1e5, 1e5), cached=[cached]).assignments
    assert fresh.bucket.widths == (100, 90) and fresh.program == "new"
    assert "cached" in plan(claim, costs(1e5, 10.0), cached=[cached]).describe()


def test_a_second_claim_of_new_widths_that_fit_compiles_nothing():
    ds = load_dataset({"name": "synthetic", "samples": 300, "features": 8, "classes": 3}, seed=4)
    data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
    monitor = ("dev_accuracy", True)
    estimate = Costs(100.0, 1.0, 1e9, epochs=2, train_examples=192, dev_examples=48, group_size=4)

    def claim(shapes):
        chosen = plan(shapes, estimate, compiled=compiled_buckets(data, monitor))
        for a in chosen.assignments:
            members = [shapes[i] for i in a.members]
            hparams = [{"learning_rate": 0.05, "seed": i} for i in a.members]
            train_batch(members, hparams, data, epochs=2, bucket=a.bucket, monitor=monitor)
        return chosen

    first = claim([shape(48, 40), shape(20), shape(33, 12, optimizer="adam"), shape(7)])
    assert len(first.assignments) == 1 and not first.assignments[0].compiled
    before = compile_count()
    second = claim([shape(47), shape(30, 39), shape(5, 3, optimizer="adam")])
    assert [a.compiled for a in second.assignments] == [True]
    assert compile_count() == before


@pytest.mark.parametrize("trials", [1, 3, 4, 5, 9])
def test_a_bucket_costs_the_slots_the_engine_trains_it_in(trials):
    ds = load_dataset({"name": "synthetic", "samples": 120, "features": 8, "classes": 3}, seed=1)
    data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
    hparams = [{"learning_rate": 0.05, "seed": i} for i in range(trials)]
    result = train_batch(shape(6), hparams, data, epochs=1, group_size=4)
    slot_epochs = trials / result.occupancy  # one epoch each: the live slot-epochs are `trials`
    assert costs(0.0, group_size=4).slots(trials) == pytest.approx(slot_epochs)


def test_slots_are_whole_multiples_of_the_devices_and_idle_devices_count():
    on_two = Costs(1.0, 1.0, 1e9, 1, 32, 0, group_size=4, devices=2)
    # One trial trains on one of two devices: the other's share of the time is lost.
    assert [on_two.slots(n) for n in (1, 2, 3, 4, 5, 9)] == [2, 2, 4, 4, 8, 12]


def test_a_lone_trial_is_charged_its_own_slot_not_a_full_group():
    """Charged a group of 4 each, a lone 64-wide trial would ride free in a 512-wide one's
    bucket; trained alone it costs 64, padded 512, against a compile of 300."""
    chosen = plan([shape(64), shape(512)], costs(300.0, group_size=4))
    assert sorted(a.bucket.widths for a in chosen.assignments) == [(64,), (512,)]
