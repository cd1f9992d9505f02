"""Running a benchmark as users do, on a tiny workload: `python -m bench.<name> ARGS`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]


class BenchRun(NamedTuple):
    """What a benchmark printed: its stdout lines and the JSON of the last one."""

    lines: list[str]
    result: dict


def run_bench(module: str, *args: str, env: dict[str, str] | None = None) -> BenchRun:
    """Run `python -m bench.<module> ARGS` from the repository root; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return BenchRun(lines, json.loads(lines[-1]))


@pytest.fixture
def bench() -> Callable[..., BenchRun]:
    return run_bench


@pytest.fixture
def bench_postgres_env(postgres_url) -> dict[str, str]:
    """A database of its own for a benchmark, which drops and creates the one it is given (named
    after the test database, so that each pytest-xdist worker has its own)."""
    return {"CAVIAR_BENCH_POSTGRES_URL": postgres_url + "_bench"}
