"""`python -m bench.pool` on a tiny workload: throughput with 1 and 2 workers, and recovery.

Not a timed test: it checks that the benchmark works, not how fast anything is.
"""

import pytest


@pytest.mark.slow
def test_pool_measures_throughput_and_recovery_after_sigkill(bench, bench_postgres_env):
    args = ["--trials", "4", "--epochs", "20", "--grace", "3"]
    _, result = bench("pool", *args, env=bench_postgres_env)
    assert [row["workers"] for row in result["throughput"]] == [1, 2]
    for row in result["throughput"]:
        assert row["trials"] == 4 and row["trials_per_min"] > 0
        assert row["max_connections_per_worker"] >= 1
    assert result["recovery"]["completed_trials"] == 4
    assert result["recovery"]["sigkill_to_rerun_s"] > 0
