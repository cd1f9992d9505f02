"""`python -m bench.mixed` on a tiny workload: every contender runs on the same configurations.

Not a timed test: it checks that the benchmark works, not how fast anything is.
"""

import pytest


@pytest.mark.slow
def test_mixed_runs_every_strategy_and_both_per_trial_loops(bench):
    lines, result = bench("mixed", "--trials", "3", "--epochs", "1", "--rounds", "1")
    assert lines[0].startswith("machine: ") and lines[1].startswith("workload: 3 trials")
    assert result["benchmark"] == "mixed"
    rows = {row["contender"]: row for row in result["rows"]}
    caviar = {"caviar-auto", "caviar-auto-serial", "caviar-auto-cached"}
    caviar |= {"caviar-exact", "caviar-single"}
    assert set(rows) == {*caviar, "flax", "torch"}
    assert rows["caviar-auto"]["wall_over_auto"] == 1
    assert rows["caviar-exact"]["padding_waste"] == 1  # one program per shape: no padding
    assert rows["caviar-single"]["buckets"] == 1
    assert rows["caviar-auto"]["cached_buckets"] == 0  # no compilation cache
    assert rows["caviar-auto-cached"]["cached_buckets"] <= rows["caviar-auto-cached"]["buckets"]
    for name in caviar:
        assert rows[name]["compiles"] >= rows[name]["buckets"] >= 1
        assert rows[name]["padding_waste"] >= 1
    for row in rows.values():
        assert row["wall_s"] > 0 and row["share_of_peak"] > 0
        assert 0 <= row["selected_test_acc"] <= 1
