"""Time to quality with pruning: Caviar's ASHA with slot refill against ASHA elsewhere.

    python -m bench.pruning [--dataset mnist1d] [--budget-s 120] [--epochs 20] [--rounds 3]
        [--target 0.65] [--samples 6250]
        [--contenders caviar-random,caviar-asha,optuna-torch-sha,ray-asha]

Workload: a random search on MNIST-1D (`--samples` 6250: 4000 train / 1000 dev / 1250 test;
target dev accuracy 0.65) or on scikit-learn's digits (`--dataset digits`: 1150 / 288 / 359;
target 0.97) over the mixed-shape space of `bench.mixed`: width 32–512 (log, int), 1–3 hidden
layers, ReLU, momentum or Adam, learning rate log-uniform in [1e-4, 1], 1-β log-uniform in
[1e-3, 1e-1], L2 log-uniform in [1e-6, 1e-2], minibatch 128, up to `--epochs` epochs a trial.
Every contender has the same wall-clock budget `--budget-s` and as many trials as it can start
in it:

- caviar-random: the real path (a spec → Optuna on SQLite → `search.runner.run_search` → the
  planner → the engine), random search, no pruner, `budget: {trials: 10000, timeout_s: B}`;
- caviar-asha: the same with `pruner: {name: asha, min_epochs: 1, reduction_factor: 3}`; the
  slot of a pruned (or diverged, or complete) trial goes at once to a new trial;
- optuna-torch-sha: a plain Optuna script, RandomSampler, `SuccessiveHalvingPruner`
  (min_resource 1, reduction factor 3) and a per-trial PyTorch loop on the CPU
  (`bench/pruning_torch.py`, in the virtualenv `bench.peers` creates), `optimize(timeout=B)`;
- ray-asha: Ray Tune's `ASHAScheduler` (grace period 1, reduction factor 3, max_t epochs, dev
  accuracy) over a per-trial PyTorch trainable on the CPU (`bench/pruning_ray.py`), one trial
  per core, actors reused, 10,000 samples, `time_budget_s`, in a virtualenv of its own with
  ray[tune] and torch that this benchmark creates on first use under `.cache/` (never a
  dependency of Caviar).

Each contender runs in a fresh process, in turn (A B C D A B C D …), `--rounds` times; round r
seeds every contender's sampler with r. Figures per run: the wall time from the start until a
trial first reported `--target` dev accuracy after an epoch (None: never in the budget; for
Caviar read from the epochs' reports to Optuna as they are made), trials started (trained at
least one epoch) per minute, trials pruned, the picked trial's dev and test accuracy (each
system's own pick: Caviar's best trial, tested once; Optuna's best complete trial; Ray's
`get_best_result`), and for Caviar the engine's slot occupancy (the share of slot-epochs that
trained a live trial, `BatchResult.occupancy`, weighted over batches). The table has medians
over rounds and each time to target over caviar-asha's. Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.common import (
    benchmark_venv,
    chosen_contenders,
    machine,
    median,
    print_table,
    run_contender,
)
from bench.engine import BATCH
from bench.mixed import MIXED_SPACE
from bench.peers import TORCH, torch_python

CONTENDERS = ("caviar-random", "caviar-asha", "optuna-torch-sha", "ray-asha")
REFERENCE = "caviar-asha"
SAMPLES = 6250  # MNIST-1D: 4000 train / 1000 dev / 1250 test


class Workload(NamedTuple):
    """A dataset of the benchmark: its name in the output and its default target dev accuracy."""

    title: str
    target: float


#: The datasets, each target calibrated on one run: on MNIST-1D the picked trials reached
#: 0.67-0.68 and none 0.70; on digits the best trial of a 30 s ASHA search reached 0.983, after
#: 0.972 in its 8th round.
DATASETS = {"mnist1d": Workload("MNIST-1D", 0.65), "digits": Workload("digits", 0.97)}
MIN_EPOCHS, REDUCTION_FACTOR = 1, 3
TRIALS = 10_000  # never the limit: the budget is the wall time
RAY = "ray[tune]==2.60.0"
RAY_VENV = Path(__file__).resolve().parent.parent / ".cache" / "bench-ray-2.60.0"


def write_data(directory: Path, dataset: str, samples: int) -> Path:
    """The dataset's ready splits as one .npz (bench.peers' layout), the same for every
    contender; `samples` is MNIST-1D's size."""
    from caviar.models.data import load_dataset

    source = {"name": "mnist1d", "samples": samples} if dataset == "mnist1d" else {"name": dataset}
    ds = load_dataset(source)
    path = directory / f"{dataset}.npz"
    splits = ("x_train", "y_train", "x_dev", "y_dev", "x_test", "y_test")
    np.savez(path, **{name.removesuffix("_train"): getattr(ds, name) for name in splits})
    return path


def spec_text(data: Path, epochs: int, budget_s: float, seed: int, asha: bool) -> str:
    """The Caviar spec of the workload, with or without the ASHA pruner."""
    pruner = (
        f"pruner: {{name: asha, min_epochs: {MIN_EPOCHS}, reduction_factor: {REDUCTION_FACTOR}}}"
        if asha
        else "pruner: {name: none}"
    )
    return f"""
name: pruning
dataset: {{path: {data}}}
budget: {{trials: {TRIALS}, epochs: {epochs}, timeout_s: {budget_s}}}
sampler: random
seed: {seed}
{pruner}
{MIXED_SPACE}"""


# --- contenders, each in its own process ------------------------------------------------------


def run_caviar(
    data: Path, epochs: int, budget_s: float, seed: int, target: float, asha: bool, workdir: Path
) -> dict:
    """Contender: `caviar run`'s path on the spec, timed from the start of `run_search`.

    Wraps (in this process only) the worker's `report_epoch`, to see each epoch's dev accuracy
    as it is reported, and `train_buckets`, to read each lane's slot occupancy.
    """
    import caviar.search.trials as worker
    from caviar.db.migrate import upgrade
    from caviar.search.runner import run_search, start_search
    from caviar.search.spec import parse_spec

    reached: list[float] = []
    started: set[tuple[str, int]] = set()
    batches: list[tuple[int, float]] = []  # (trial-epochs trained, occupancy) per lane
    report_epoch, train_buckets = worker.report_epoch, worker.train_buckets

    def reporting(study, reports) -> None:
        report_epoch(study, reports)
        started.update((study.study_name, trial.number) for trial, _, _ in reports)
        if not reached and any(value >= target for _, value, _ in reports):
            reached.append(time.perf_counter() - start)

    def training(*args, **kwargs):
        results = train_buckets(*args, **kwargs)
        batches.extend((sum(t.epochs for t in r.trials), r.occupancy) for r in results)
        return results

    worker.report_epoch, worker.train_buckets = reporting, training
    spec = parse_spec(spec_text(data, epochs, budget_s, seed, asha))
    url = f"sqlite:///{workdir / 'caviar.db'}"
    upgrade(url)
    search_id = start_search(url, spec)
    start = time.perf_counter()
    result = run_search(url, search_id)
    wall = time.perf_counter() - start
    best = result.best or {}
    live = sum(trained for trained, _ in batches)
    slots = sum(trained / occupancy for trained, occupancy in batches if occupancy > 0)
    return {
        "wall_s": wall,
        "time_to_target_s": reached[0] if reached else None,
        "trials_started": len(started),
        "complete": result.counts.get("complete", 0),
        "pruned": result.counts.get("pruned", 0),
        "picked_dev_accuracy": best.get("dev_accuracy"),
        "picked_test_accuracy": best.get("test_accuracy"),
        "occupancy": live / slots if slots else None,
    }


def ray_python() -> Path:
    """The Ray contender's interpreter: a virtualenv of its own, created on first use (the
    trainable reuses `pruning_torch.py`, which imports Optuna)."""
    return benchmark_venv(RAY_VENV, [RAY, TORCH, "pandas"])


def run_script(python: Path, script: str, data: Path, args: list[str]) -> dict:
    """A contender script in its virtualenv; the JSON of its last line."""
    path = Path(__file__).with_name(script)
    completed = subprocess.run(
        [python, path, str(data), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(path.parent)},
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the side-by-side run ---------------------------------------------------------------------


def one_round(
    contenders: list[str], data: Path, epochs: int, budget_s: float, seed: int, target: float
) -> dict[str, dict]:
    """Every contender once, in turn, each in a fresh process."""
    common = ["--epochs", str(epochs), "--budget-s", str(budget_s), "--target", str(target)]
    common += ["--seed", str(seed)]
    shared = [*common, "--min-epochs", str(MIN_EPOCHS)]
    shared += ["--reduction-factor", str(REDUCTION_FACTOR)]
    results: dict[str, dict] = {}
    for name in contenders:
        if name.startswith("caviar-"):
            args = [*common, "--data", str(data), "--contender", name]
            results[name] = run_contender("bench.pruning", args)
        elif name == "optuna-torch-sha":
            results[name] = run_script(torch_python(), "pruning_torch.py", data, shared)
        else:
            results[name] = run_script(ray_python(), "pruning_ray.py", data, shared)
        reached = results[name]["time_to_target_s"]
        print(
            f"  {name}: {results[name]['trials_started']} trials in "
            f"{results[name]['wall_s']:.1f} s, target "
            + ("not reached" if reached is None else f"at {reached:.1f} s"),
            file=sys.stderr,
        )
    return results


def table(runs: dict[str, list[dict]]) -> list[dict]:
    """Medians over rounds per contender; time to target also over caviar-asha's."""

    def figure(results: list[dict], key: str) -> float | None:
        values = [r[key] for r in results if r.get(key) is not None]
        return median(values) if values else None

    def to_target(results: list[dict]) -> float | None:
        """The median time to target, a run that never reached it counting as infinitely long."""
        times = [r["time_to_target_s"] for r in results]
        value = median([np.inf if t is None else t for t in times])
        return None if np.isinf(value) else value

    reference = to_target(runs.get(REFERENCE, []) or [{"time_to_target_s": None}])
    rows = []
    for name, results in runs.items():
        reached = to_target(results)
        rows.append(
            {
                "contender": name,
                "time_to_target_s": reached,
                "over_asha": reached / reference if reached and reference else None,
                "reached": f"{sum(r['time_to_target_s'] is not None for r in results)}"
                f"/{len(results)}",
                "trials_per_min": median([60 * r["trials_started"] / r["wall_s"] for r in results]),
                "pruned": figure(results, "pruned"),
                "complete": figure(results, "complete"),
                "wall_s": figure(results, "wall_s"),
                "picked_dev_acc": figure(results, "picked_dev_accuracy"),
                "picked_test_acc": figure(results, "picked_test_accuracy"),
                "occupancy": figure(results, "occupancy"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=120.0, help="wall clock per contender")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="contenders run in turn, N times")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mnist1d")
    parser.add_argument(
        "--target", type=float, help="dev accuracy to reach (default: the dataset's, DATASETS)"
    )
    parser.add_argument("--samples", type=int, default=SAMPLES, help="MNIST-1D examples")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.target is None:
        args.target = DATASETS[args.dataset].target

    if args.contender:  # inside a contender's own process
        from caviar.models.runtime import use_every_core

        use_every_core()  # as `caviar run` does
        with tempfile.TemporaryDirectory() as workdir:
            out = run_caviar(
                Path(args.data),
                args.epochs,
                args.budget_s,
                args.seed,
                args.target,
                args.contender == "caviar-asha",
                Path(workdir),
            )
        print(json.dumps(out))
        return

    contenders = chosen_contenders(parser, args.contenders, CONTENDERS)
    if "optuna-torch-sha" in contenders:
        torch_python()  # create the virtualenvs before any timing
    if "ray-asha" in contenders:
        ray_python()
    info = machine()
    print(f"machine: {info}")
    with tempfile.TemporaryDirectory() as directory:
        data = write_data(Path(directory), args.dataset, args.samples)
        with np.load(data) as arrays:
            sizes = [len(arrays[name]) for name in ("y", "y_dev", "y_test")]
        print(
            f"workload: {DATASETS[args.dataset].title} {sizes[0]} train / {sizes[1]} dev / "
            f"{sizes[2]} test, random search, widths 32-512 (log, int), 1-3 hidden layers, "
            f"relu, momentum or adam, batch {BATCH}, up to {args.epochs} epochs a trial, log lr "
            f"[1e-4, 1], log 1-β [1e-3, 1e-1], log L2 [1e-6, 1e-2]; ASHA min {MIN_EPOCHS} "
            f"epoch, reduction factor {REDUCTION_FACTOR}; {args.budget_s:g} s per contender; "
            f"target dev accuracy {args.target}; {args.rounds} rounds (seeds "
            f"0-{args.rounds - 1})"
        )
        runs: dict[str, list[dict]] = {}
        for seed in range(args.rounds):
            print(f"round {seed + 1}/{args.rounds}", file=sys.stderr)
            started = time.perf_counter()
            for name, result in one_round(
                contenders, data, args.epochs, args.budget_s, seed, args.target
            ).items():
                runs.setdefault(name, []).append(result)
            print(f"  round took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = table(runs)
    print_table(rows, list(rows[0]))
    print(
        json.dumps(
            {
                "benchmark": "pruning",
                "machine": info,
                "dataset": args.dataset,
                "samples": sum(sizes),
                "epochs": args.epochs,
                "budget_s": args.budget_s,
                "target": args.target,
                "rounds": args.rounds,
                "rows": rows,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
