"""`python -m bench.engine` on a tiny workload: both contenders run and the figures add up.

Not a timed test: it checks that the benchmark works, not how fast anything is.
"""

import pytest


@pytest.mark.slow
def test_engine_compares_caviar_cold_warm_and_per_device_count_with_the_per_trial_loop(bench):
    lines, result = bench(
        "engine", "--trials", "2", "--epochs", "1", "--group-sizes", "2", "--cpu-devices", "1,2"
    )
    assert lines[0].startswith("machine: ") and lines[1].startswith("workload: 2 trials")
    rows = {row["contender"]: row for row in result["rows"]}
    caviar = {f"caviar g=2 d={d} ({c})" for d in (1, 2) for c in ("cold", "warm cache")}
    assert set(rows) == caviar | {"per-trial loop"}
    assert rows["per-trial loop"]["speedup_vs_loop"] == 1
    for row in rows.values():
        assert row["wall_s"] > 0 and row["share_of_peak"] > 0
        assert 0 <= row["selected_test_acc"] <= 1


@pytest.mark.slow
def test_engine_compares_rounds_in_lockstep_and_dispatched_ahead_and_counts_launches(bench):
    lines, result = bench(
        "engine",
        *("--trials", "2", "--epochs", "2", "--group-sizes", "2"),
        *("--dispatch", "lockstep,ahead", "--callback-ms", "5"),
    )
    assert "a 5 ms wait per report" in lines[1]
    rows = {row["contender"]: row for row in result["rows"]}
    modes = {f"caviar g=2 {m} ({c})" for m in ("lockstep", "ahead") for c in ("cold", "warm cache")}
    assert set(rows) == modes | {"per-trial loop"}
    for name in modes:
        # One group of two trials: one launch a round for two trial-epochs; each round's
        # metrics are one host read, and so is each trial's state as it leaves.
        assert rows[name]["launches_per_trial_epoch"] == 0.5
        assert rows[name]["host_reads_per_round"] == 2
    assert rows["per-trial loop"]["launches_per_trial_epoch"] is None
