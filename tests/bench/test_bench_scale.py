"""`python -m bench.scale` runs every section on a tiny workload (a smoke test, not a timing)."""

import json

import pytest

TINY = [
    "--epochs", "2", "--trials", "2", "--trial-counts", "2,4", "--train-sizes", "256,512",
    "--widths", "8,16", "--storage-trials", "4",
    "--api-trials", "4", "--api-clients", "4", "--api-requests", "5",
]  # fmt: skip


@pytest.mark.slow
def test_every_section_runs_and_plots(bench, bench_postgres_env, tmp_path):
    out = tmp_path / "results"
    lines, result = bench("scale", *TINY, "--out", str(out), env=bench_postgres_env)
    assert lines[0].startswith("machine: ")
    assert result["benchmark"] == "scale" and result["peak_gflops"] > 0

    assert [r["trials"] for r in result["trials"]] == [2, 4]
    assert [r["train"] for r in result["data"]] == [256, 512]
    assert [r["width"] for r in result["width"]] == [8, 16]
    for row in result["trials"] + result["data"] + result["width"]:
        assert row["wall_s"] >= row["first_epoch_s"] > 0
        assert row["s_per_trial"] > 0 and row["ms_per_trial_epoch"] > 0 and row["gflop_per_s"] > 0

    assert [r["backend"] for r in result["storage"]] == ["sqlite", "postgresql"]
    for row in result["storage"]:
        assert row["ms_per_trial"] >= row["ask_ms"] > 0 and row["report_ms"] > 0
        assert row["training_s_per_trial"] == result["trials"][0]["s_per_trial"]
        assert row["pct_of_training"] > 0

    api = result["api"]
    assert api["requests"] == 20 and api["search_trials"] == 4
    assert 0 < api["p50_ms"] <= api["p99_ms"] <= api["max_ms"] and api["requests_per_s"] > 0

    for section in ("trials", "data", "width", "storage", "api"):
        assert (out / f"scale-{section}.png").stat().st_size > 1000
    assert json.loads((out / "scale.json").read_text()) == result
