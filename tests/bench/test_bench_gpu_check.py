"""`python -m bench.gpu_check --quick` on the CPU: every part runs and passes its check.

Not a timed test: it checks that the command works as a user would read it, CPU against CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # pytest puts this folder on sys.path; mypy knows the file by its path
    from tests.bench.conftest import BenchRun


@pytest.mark.slow
def test_gpu_check_on_the_cpu_passes_parity_compiles_throughput_and_skips_oom(
    bench: Callable[..., BenchRun], tmp_path: Path
) -> None:
    out = tmp_path / "gpu.json"
    lines, printed = bench("gpu_check", "--quick", "--out", str(out), env={"JAX_PLATFORMS": "cpu"})
    assert lines[0].startswith("machine: ") and lines[1].startswith("workload: ")
    result = json.loads(out.read_text())
    assert result == printed
    assert result["machine"]["backend"] == "cpu" and result["machine"]["device_count"] >= 1
    assert {"parity", "compiles", "throughput", "out_of_memory"} <= set(result)

    parity = result["parity"]
    assert parity["device_backend"] == parity["reference_backend"] == "cpu"
    assert len(parity["rows"]) >= 4
    assert parity["max_rel_diff"]["highest"] < 1e-5
    assert parity["max_rel_diff"]["default"] < 1e-5

    compiles = result["compiles"]
    assert compiles["rows"]
    for row in compiles["rows"]:
        assert row["epoch_compiles_first"] == 1, row  # one program per bucket
        assert row["xla_compiles_again"] == 0, row  # and nothing when it trains again
    assert compiles["modules_scanned"] >= 1 and compiles["modules_with_f64"] == []
    assert "float64" not in compiles["kept_dtypes"]

    throughput = result["throughput"]
    rows = throughput["rows"]
    assert [row["trials"] for row in rows] == result["workload"]["sizes"]
    for row in rows:
        for rate in (
            "fused_tep_s",
            "fused_cb_tep_s",
            "fused_cb_ahead_tep_s",
            "loop_tep_s",
            "loop_cb_tep_s",
        ):
            assert row[rate] > 0, (rate, row)
        assert row["gpu_util_pct"] is None
    assert rows[-1]["fused_tep_s"] > rows[-1]["loop_tep_s"]
    assert throughput["utilisation"] == "not a GPU"

    assert result["out_of_memory"]["status"] == "skipped on cpu"
    assert all(result["checks"].values()), result["checks"]
