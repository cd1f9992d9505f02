"""`python -m bench.quality` runs end to end on a tiny workload (the full run is no test)."""

import pytest

from bench.quality import STRATEGIES


@pytest.mark.slow
def test_quality_benchmark_runs_every_strategy_on_a_tiny_workload(bench, tmp_path):
    args = ["--seeds", "1", "--datasets", "digits", "--trials", "8", "--epochs", "3"]
    lines, report = bench("quality", *args, "--batch", "4", "--out", str(tmp_path))
    assert lines[0].startswith("machine:") and lines[1].startswith("workload:")
    assert report["benchmark"] == "quality" and report["machine"]["cores"] >= 1

    rows = report["results"]
    assert sorted((r["dataset"], r["strategy"], r["seed"]) for r in rows) == sorted(
        ("digits", strategy, 0) for strategy in STRATEGIES
    )
    assert {s["strategy"] for s in report["summary"]} == set(STRATEGIES)
    for row in rows:
        assert 0 <= row["test_accuracy"] <= 1
        assert row["trial_epochs"] <= row["trial_epoch_budget"] == 8 * 3

    by_strategy = {r["strategy"]: r for r in rows}
    workload = report["workload"]
    assert len(workload["grid"]) == 8 and workload["grid_sizes"]["learning_rate"] == 2
    grid = by_strategy["grid"]
    assert grid["on_grid"] and grid["complete"] == 8 and grid["distinct_learning_rates"] == 2
    hyperband = by_strategy["hyperband"]
    assert hyperband["pruned"] > 0  # pruning freed trial-epochs for more trials than the budget's
    assert hyperband["complete"] + hyperband["pruned"] + hyperband["cut_by_budget"] > 8
    assert (tmp_path / "quality.png").stat().st_size > 0
