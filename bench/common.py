"""Shared by the benchmarks: the machine description, subprocess contenders, table printing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def machine() -> dict:
    """What the figures were measured on (`caviar_cpu_devices`: Caviar's split of a CPU)."""
    import jax

    from caviar.models.runtime import cpu_device_count

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()],
    }
    if jax.default_backend() == "cpu":
        info["caviar_cpu_devices"] = cpu_device_count()
    return info


def run_contender(module: str, args: Sequence[str], env: dict | None = None) -> dict:
    """Run `python -m module args` in a fresh process and return the JSON of its last line."""
    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """A plain fixed-width table, numbers rounded for reading."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(cell(row.get(c, "")).ljust(widths[c]) for c in columns))


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, float)))


def benchmark_venv(venv: Path, packages: Sequence[str]) -> Path:
    """The interpreter of a contender's own virtualenv (never Caviar's), created on first use
    with `packages` and the Optuna version Caviar uses; removed again if the install fails."""
    python = venv / "bin" / "python"
    if not python.exists():
        import optuna

        packages = [*packages, f"optuna=={optuna.__version__}", "numpy"]
        print(f"creating {venv} with {' '.join(packages)} (once)", file=sys.stderr)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        try:
            subprocess.run([python, "-m", "pip", "install", "--quiet", *packages], check=True)
        except subprocess.CalledProcessError:
            python.unlink()  # not usable: the next call tries again
            raise
    return python


def chosen_contenders(parser, text: str, known: Sequence[str]) -> list[str]:
    """The comma-separated contenders of `text`; an argparse error names any unknown one."""
    contenders = text.split(",")
    unknown = set(contenders) - set(known)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose among {', '.join(known)}")
    return contenders
