"""`python -m bench.peers` on a tiny workload: every contender runs and the figures add up.

Not a timed test: it checks that the benchmark works, not how fast anything is.
"""

import pytest


@pytest.mark.slow
def test_peers_runs_every_contender_on_the_same_configurations(bench):
    lines, result = bench("peers", "--trials", "3", "--epochs", "2", "--rounds", "1")
    assert lines[0].startswith("machine: ") and lines[1].startswith("workload: 3 trials")
    assert result["benchmark"] == "peers"
    assert result["same_configurations"], "every contender must train the same trials"
    rows = {row["contender"]: row for row in result["rows"]}
    assert set(rows) == {
        "caviar (cold)",
        "caviar (warm cache)",
        "optuna-flax",
        "optuna-torch",
        "sklearn",
    }
    assert rows["caviar (cold)"]["wall_over_caviar"] == 1
    for row in rows.values():
        assert row["wall_s"] > 0 and row["gflop_per_s"] > 0
        assert row["trials_per_min"] == pytest.approx(60 * 3 / row["wall_s"])
        assert 0 <= row["selected_test_acc"] <= 1
    for name in ("optuna-flax", "optuna-torch", "sklearn"):
        assert rows[name]["median_test_acc"] <= rows[name]["best_test_acc"] <= 1
    assert rows["caviar (cold)"]["best_test_acc"] is None  # Caviar tests only its pick, once
