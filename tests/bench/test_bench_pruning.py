"""`python -m bench.pruning` on a tiny workload: the Caviar contenders, with and without ASHA.

Not a timed test: it checks that the benchmark works, not how fast anything is. The PyTorch and
Ray contenders need their virtualenvs, so they are left out here.
"""

import pytest


@pytest.mark.slow
def test_pruning_runs_caviar_with_and_without_asha(bench):
    lines, result = bench(
        "pruning",
        *("--contenders", "caviar-random,caviar-asha", "--rounds", "1"),
        *("--budget-s", "10", "--epochs", "3", "--samples", "1000", "--target", "0.05"),
    )
    assert lines[0].startswith("machine: ")
    assert lines[1].startswith("workload: MNIST-1D 640 train / 160 dev / 200 test")
    assert result["benchmark"] == "pruning"
    assert (result["budget_s"], result["epochs"], result["target"]) == (10, 3, 0.05)
    rows = {row["contender"]: row for row in result["rows"]}
    assert set(rows) == {"caviar-random", "caviar-asha"}
    assert rows["caviar-asha"]["over_asha"] == 1
    assert rows["caviar-random"]["pruned"] == 0
    for name, row in rows.items():
        assert row["reached"] == "1/1"  # any trial's first epoch beats 5% on 10 classes
        assert 0 < row["time_to_target_s"] < row["wall_s"]
        assert row["trials_per_min"] > 0
        assert 0 < row["occupancy"] <= 1
        assert row["picked_test_acc"] is None or 0 <= row["picked_test_acc"] <= 1
        (run,) = result["runs"][name]
        assert run["trials_started"] >= 1
        assert run["wall_s"] < 10 + 60  # timeout_s stopped the search (plus compiling, testing)


@pytest.mark.slow
def test_pruning_runs_on_digits_with_its_own_target(bench):
    lines, result = bench(
        "pruning",
        *("--dataset", "digits", "--contenders", "caviar-asha", "--rounds", "1"),
        *("--budget-s", "5", "--epochs", "2"),
    )
    assert lines[1].startswith("workload: digits 1150 train / 288 dev / 359 test")
    assert "target dev accuracy 0.97;" in lines[1]  # the dataset's default, not MNIST-1D's
    assert (result["dataset"], result["samples"], result["target"]) == ("digits", 1797, 0.97)
    (run,) = result["runs"]["caviar-asha"]
    assert run["trials_started"] >= 1
    assert run["pruned"] + run["complete"] <= run["trials_started"]
