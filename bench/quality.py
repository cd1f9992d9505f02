"""Search quality: does each piece of Caviar's tuning practice pay off, at equal compute?

    python -m bench.quality [--seeds 5] [--datasets mnist1d,digits] [--trials 32] [--epochs 20]
        [--batch 8] [--strategies grid,random_linear,random_log,coarse_to_fine,tpe,hyperband]
        [--target mnist1d=0.6,digits=0.97] [--hyperband-factor 4] [--keep-top 0.1]
        [--optimizer momentum|adam] [--out bench/results]

Workload: MNIST-1D (5000 samples: 3200 train / 800 dev / 1000 test) and scikit-learn's digits
(1150 / 288 / 359); MLP with 2 hidden layers of 256 ReLU units, SGD with momentum (or Adam with
`--optimizer adam`, β then being Adam's β1; plot quality-adam.png), minibatch 128.
The right scales: learning rate log-uniform in [1e-4, 1], β through 1-β log-uniform in
[1e-3, 1e-1] (β in [0.9, 0.999]), L2 log-uniform in [1e-6, 1e-2]. Every strategy is a real
Caviar search (`run_search` on an SQLite database, `--batch` trials asked at a time) with
the same budget of `--trials` × `--epochs` trial-epochs (one trial trained for one epoch):

- grid: `--trials` points enqueued on stage 1's study, n_lr × n_1-β × n_L2 (near-cubic, the most
  values to the learning rate), cell centres of each range on its log scale;
- random_linear: random sampler, all three ranges on a linear scale;
- random_log: random sampler on the right scales;
- coarse_to_fine: random on the right scales, two stages of half the trials each; stage 2 zooms
  into stage 1's top `--keep-top` (Caviar's default 0.1 unless given);
- tpe: Caviar's TPE (multivariate, constant liar) on the right scales;
- hyperband: random on the right scales with Caviar's Hyperband pruner (min 2 epochs); its trial
  cap is `--hyperband-factor` × `--trials`, and it stops when the trial-epoch budget is spent.

Seed s (0 ≤ s < `--seeds`) is the spec seed of every strategy's search: it seeds the sampler and
the data (MNIST-1D's generation and both datasets' split), so within a seed all strategies see
the same data (and the random strategies the same random stream: random_log, hyperband, stage 1
of coarse_to_fine and TPE's startup trials begin with the same points), and the spread over
seeds includes the split's. Runs interleave (every strategy of seed 0, then of seed 1, ...) and
each dataset's programs are compiled by a warm-up search first. Reports the best trial's test
accuracy (refit, tested once), its paired difference from random_log, and the wall time from
the start of the search until a complete trial first reached `--target` dev accuracy (a batch's
trials finish together; the default targets are guesses, calibrate them on a full run). Prints
a table per dataset, writes `quality.png` to `--out`, and ends with a JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import Trial, TrialState

from bench.common import machine, median, print_table
from caviar.db.migrate import upgrade
from caviar.db.storage import optuna_storage
from caviar.models.runtime import use_every_core
from caviar.search.runner import open_stage, run_search, search_trials, start_search
from caviar.search.space import distribution, optuna_name
from caviar.search.spec import FloatParam, SearchSpec
from caviar.search.trials import TrialOutcome

STRATEGIES = ("grid", "random_linear", "random_log", "coarse_to_fine", "tpe", "hyperband")
DATASETS: dict[str, dict[str, Any]] = {
    "mnist1d": {"name": "mnist1d", "samples": 5000},
    "digits": {"name": "digits"},
}
DEFAULT_TARGETS = {"mnist1d": 0.6, "digits": 0.97}
#: The right scales, in order of importance (the grid gives its axes values in this order).
SPACE: dict[str, dict[str, Any]] = {
    "learning_rate": {"low": 1e-4, "high": 1.0, "scale": "log"},
    "momentum": {"low": 0.9, "high": 0.999, "scale": "one_minus_log"},
    "l2": {"low": 1e-6, "high": 1e-2, "scale": "log"},
}
FIXED = {
    "optimizer": "momentum",
    "batch_size": 128,
    "hidden_units": 256,
    "hidden_layers": 2,
    "activation": "relu",
}
BASELINE = "random_log"
BUDGET_STOP = "budget"


def build_spec(
    strategy: str,
    dataset: str,
    seed: int,
    trials: int,
    epochs: int,
    *,
    keep_top: float | None = None,
    hyperband_factor: int = 4,
    optimizer: str = "momentum",
) -> SearchSpec:
    """The search spec of one strategy (grid: a plain spec; its points are enqueued separately)."""
    spec: dict[str, Any] = {
        "name": f"quality-{dataset}-{strategy}-{seed}",
        "dataset": DATASETS[dataset],
        "budget": {"trials": trials, "epochs": epochs},
        "seed": seed,
        "space": SPACE,
        "fixed": {**FIXED, "optimizer": optimizer},
    }
    if strategy == "random_linear":
        spec["space"] = {name: {**param, "scale": "linear"} for name, param in SPACE.items()}
    elif strategy == "coarse_to_fine":
        refine = {} if keep_top is None else {"keep_top": keep_top}
        spec["stages"] = [{"trials": trials // 2}, {"trials": trials - trials // 2, **refine}]
    elif strategy == "tpe":
        spec["sampler"] = "tpe"
    elif strategy == "hyperband":
        spec["budget"]["trials"] = trials * hyperband_factor
        spec["pruner"] = {"name": "hyperband"}
    return SearchSpec.model_validate(spec)


def grid_sizes(count: int, axes: int = 3) -> tuple[int, ...]:
    """Values per axis, most first, multiplying to `count`: the factorisation nearest a cube."""
    best: tuple[int, ...] = (count, *[1] * (axes - 1))
    divisors = [d for d in range(1, count + 1) if count % d == 0]
    for sizes in itertools.product(divisors, repeat=axes - 1):
        rest, remainder = divmod(count, math.prod(sizes))
        if remainder == 0:
            candidate = tuple(sorted((*sizes, rest), reverse=True))
            if candidate[0] / candidate[-1] < best[0] / best[-1]:
                best = candidate
    return best


def grid_points(spec: SearchSpec, count: int) -> list[dict[str, float]]:
    """`count` grid points in Optuna's names and values (1-β for β): per axis, the centres of
    equal cells of the range on its sampling scale."""
    axes = []
    sizes = grid_sizes(count, len(spec.space))
    for (name, param), size in zip(spec.space.items(), sizes, strict=True):
        assert isinstance(param, FloatParam)
        dist = distribution(param)
        assert isinstance(dist, optuna.distributions.FloatDistribution)  # of a FloatParam
        low, high = (math.log(dist.low), math.log(dist.high)) if dist.log else (dist.low, dist.high)
        centres = [low + (high - low) * (i + 0.5) / size for i in range(size)]
        axes.append([(optuna_name(name, param), math.exp(c) if dist.log else c) for c in centres])
    return [dict(point) for point in itertools.product(*axes)]


def enqueue_grid(
    storage: optuna.storages.BaseStorage, spec: SearchSpec, search_id: str, grid: list[dict]
) -> None:
    """Create stage 1's study and enqueue the grid: `ask()` hands out waiting trials first."""
    study, _ = open_stage(storage, spec, search_id, 1, spec.resolved_objective("classification"))
    for point in grid:
        study.enqueue_trial(point)


@dataclass
class TrialEpochBudget:
    """Stops a search before it trains more than `limit` trial-epochs.

    Within a batch, trials train in lockstep, and only those short of `epochs` can train another
    epoch; a new batch starts up to `batch` trials. A stop is asked for as soon as the next epoch
    could overrun, so the budget is never exceeded and a batch's last epoch is never cut.
    """

    limit: int
    epochs: int
    batch: int
    used: int = 0
    _trained: dict[tuple[str, int], int] = field(default_factory=dict, init=False, repr=False)
    _going_on: int | None = field(default=None, init=False, repr=False)

    def on_epoch(self, trials: list[Trial]) -> None:
        """Count an epoch of `trials` (run_search's `on_epoch`)."""
        self.used += len(trials)
        self._going_on = 0
        for trial in trials:
            key = (trial.study.study_name, trial.number)
            self._trained[key] = self._trained.get(key, 0) + 1
            self._going_on += self._trained[key] < self.epochs

    def should_stop(self) -> str | None:
        """`budget` once the next epoch could overrun (run_search's `should_stop`)."""
        upcoming = self.batch if self._going_on is None else self._going_on
        self._going_on = None  # the next call without an epoch between is before a new batch
        return BUDGET_STOP if self.used + upcoming > self.limit else None


def run_one(
    url: str,
    spec: SearchSpec,
    strategy: str,
    budget: TrialEpochBudget,
    target: float,
    grid: list[dict] | None,
) -> dict[str, Any]:
    """Run one strategy's search under `budget`; return its figures."""
    outcomes: list[TrialOutcome] = []
    reached: list[float] = []
    start = time.perf_counter()

    def on_trial(outcome: TrialOutcome) -> None:
        outcomes.append(outcome)
        if (
            outcome.state == TrialState.COMPLETE
            and outcome.value is not None
            and outcome.value >= target
            and not reached
        ):
            reached.append(time.perf_counter() - start)

    storage = optuna_storage(url)
    search_id = start_search(url, spec, search_id=spec.name)
    if grid is not None:
        enqueue_grid(storage, spec, search_id, grid)
    result = run_search(
        url,
        search_id,
        batch=budget.batch,
        should_stop=budget.should_stop,
        on_trial=on_trial,
        on_epoch=budget.on_epoch,
    )
    wall = time.perf_counter() - start
    trials = search_trials(storage, spec, result.studies)
    best = result.best or {}
    row = {
        "dataset": spec.dataset.name,
        "strategy": strategy,
        "seed": spec.seed,
        "test_accuracy": best.get("test_accuracy"),
        "dev_accuracy": best.get("dev_accuracy"),
        "time_to_target_s": reached[0] if reached else None,
        "wall_s": wall,
        "trial_epochs": budget.used,
        "trial_epoch_budget": budget.limit,
        "complete": result.counts["complete"],
        "pruned": result.counts["pruned"],
        "diverged": sum(o.reason == "diverged" for o in outcomes),
        "cut_by_budget": sum(o.reason == BUDGET_STOP for o in outcomes),
        "distinct_learning_rates": len({t.params["learning_rate"] for t in trials}),
        "best_params": best.get("params"),
    }
    if grid is not None:
        row["on_grid"] = _same_points([t.trial.params for t in trials], grid)
    return row


def _same_points(params: Sequence[dict[str, float]], grid: Sequence[dict[str, float]]) -> bool:
    """Whether the trials' Optuna params are exactly the grid's points, each once."""
    keys = sorted(grid[0])
    tried = sorted(tuple(p.get(k, math.nan) for k in keys) for p in params)
    wanted = sorted(tuple(p[k] for k in keys) for p in grid)
    return len(tried) == len(wanted) and bool(np.allclose(tried, wanted, rtol=1e-9, atol=0))


def warm_up(url: str, dataset: str, batch: int, optimizer: str) -> None:
    """Compile a dataset's programs (trial groups and the final fit) outside the timings."""
    spec = build_spec("random_log", dataset, 0, batch, 1, optimizer=optimizer)
    run_search(url, start_search(url, spec, search_id=f"warm-up-{dataset}"), batch=batch)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, strategy): test accuracy mean ± sd over seeds and the other figures."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    summary = []
    for (dataset, strategy), group in itertools.groupby(
        sorted(rows, key=lambda r: (datasets.index(r["dataset"]), STRATEGIES.index(r["strategy"]))),
        key=lambda r: (r["dataset"], r["strategy"]),
    ):
        runs = list(group)
        tests = _floats(r["test_accuracy"] for r in runs)
        times = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        baseline = {
            r["seed"]: r["test_accuracy"]
            for r in rows
            if r["dataset"] == dataset and r["strategy"] == BASELINE
        }
        deltas = _floats(
            r["test_accuracy"] - baseline[r["seed"]]
            for r in runs
            if r["test_accuracy"] is not None and baseline.get(r["seed"]) is not None
        )
        summary.append(
            {
                "dataset": dataset,
                "strategy": strategy,
                "seeds": len(runs),
                "test_mean": _stat(np.mean, tests),
                "test_sd": _stat(lambda v: np.std(v, ddof=1) if len(v) > 1 else 0.0, tests),
                "dev_mean": _stat(np.mean, _floats(r["dev_accuracy"] for r in runs)),
                "test_vs_random_log": _stat(np.mean, deltas),
                "time_to_target_median_s": median(times) if times else None,
                "reached_target": len(times),
                "wall_mean_s": float(np.mean([r["wall_s"] for r in runs])),
                "trial_epochs_mean": float(np.mean([r["trial_epochs"] for r in runs])),
                "pruned_mean": float(np.mean([r["pruned"] for r in runs])),
                "diverged_mean": float(np.mean([r["diverged"] for r in runs])),
            }
        )
    return summary


def _floats(values) -> list[float]:
    return [float(v) for v in values if v is not None]


def _stat(stat, values: list[float]) -> float | None:
    return float(stat(np.asarray(values))) if values else None


def print_summary(summary: list[dict[str, Any]], targets: dict[str, float]) -> None:
    """One table per dataset, strategies as rows."""
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        print(f"\n{dataset} (target dev accuracy {targets[dataset]})")
        rows = [
            {
                "strategy": s["strategy"],
                "test_acc": _plus_minus(s["test_mean"], s["test_sd"]),
                "vs_random_log": _signed(s["test_vs_random_log"]),
                "best_dev": s["dev_mean"],
                "to_target_s": s["time_to_target_median_s"] or "-",
                "reached": f"{s['reached_target']}/{s['seeds']}",
                "wall_s": s["wall_mean_s"],
                "trial_epochs": s["trial_epochs_mean"],
                "pruned": s["pruned_mean"],
                "diverged": s["diverged_mean"],
            }
            for s in summary
            if s["dataset"] == dataset
        ]
        print_table(rows, list(rows[0]))


def _plus_minus(mean: float | None, sd: float | None) -> str:
    return "-" if mean is None else f"{mean:.4f} ± {sd:.4f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy (mean ± sd, and each seed) and time to target per strategy and dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(s["dataset"] for s in summary))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7), squeeze=False)
    for column, dataset in enumerate(datasets):
        entries = [s for s in summary if s["dataset"] == dataset]
        names = [s["strategy"] for s in entries]
        x = np.arange(len(names))
        top, bottom = axes[0][column], axes[1][column]
        for i, name in enumerate(names):
            runs = [r for r in rows if r["dataset"] == dataset and r["strategy"] == name]
            tests = _floats(r["test_accuracy"] for r in runs)
            top.plot([i] * len(tests), tests, ".", color="0.6")
            times = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
            bottom.plot([i] * len(times), times, ".", color="0.6")
        means = [np.nan if s["test_mean"] is None else s["test_mean"] for s in entries]
        sds = [0.0 if s["test_sd"] is None else s["test_sd"] for s in entries]
        top.errorbar(x, means, yerr=sds, fmt="o", capsize=4, color="C0")
        medians = [s["time_to_target_median_s"] or np.nan for s in entries]
        bottom.plot(x, medians, "D", color="C1")
        top.set_title(dataset)
        top.set_ylabel("test accuracy of the best trial")
        bottom.set_ylabel("seconds until dev accuracy ≥ target")
        bottom.set_ylim(bottom=0)
        reached = [f"{s['strategy']} ({s['reached_target']}/{s['seeds']})" for s in entries]
        for ax, labels in ((top, names), (bottom, reached)):
            ax.set_xticks(x, labels, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(names) - 0.5)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_targets(text: str) -> dict[str, float]:
    """`mnist1d=0.7,digits=0.97` → {"mnist1d": 0.7, "digits": 0.97}."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {**DEFAULT_TARGETS, **{name: float(value) for name, value in pairs}}


def describe_workload(
    args: argparse.Namespace,
    datasets: list[str],
    strategies: list[str],
    targets: dict[str, float],
    grid: list[dict[str, float]],
) -> dict[str, Any]:
    """The exact workload, for the JSON line."""
    options = _strategy_options(args)
    fine = build_spec("coarse_to_fine", datasets[0], 0, args.trials, args.epochs, **options)
    return {
        "datasets": {name: DATASETS[name] for name in datasets},
        "strategies": strategies,
        "seeds": list(range(args.seeds)),
        "trials": args.trials,
        "epochs": args.epochs,
        "trial_epoch_budget": args.trials * args.epochs,
        "batch": args.batch,
        "space": SPACE,
        "fixed": {**FIXED, "optimizer": args.optimizer},
        "grid_sizes": dict(zip(SPACE, grid_sizes(args.trials, len(SPACE)), strict=True)),
        "grid": grid,
        "coarse_to_fine_keep_top": fine.stage_plan()[1].keep_top,
        "hyperband_trial_cap": args.trials * args.hyperband_factor,
        "targets": {name: targets[name] for name in datasets},
    }


def _strategy_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "keep_top": args.keep_top,
        "hyperband_factor": args.hyperband_factor,
        "optimizer": args.optimizer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--datasets", default="mnist1d,digits")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--trials", type=int, default=32, help="trial budget (grid points)")
    parser.add_argument("--epochs", type=int, default=20, help="most epochs per trial")
    parser.add_argument("--batch", type=int, default=8, help="trials asked at a time")
    parser.add_argument("--target", default="", help="dev accuracy targets, e.g. digits=0.97")
    parser.add_argument("--hyperband-factor", type=int, default=4, help="trial cap × --trials")
    parser.add_argument("--keep-top", type=float, help="coarse_to_fine's stage-2 keep_top")
    parser.add_argument(
        "--optimizer", default="momentum", choices=("momentum", "adam"), help="β is Adam's β1"
    )
    parser.add_argument("--out", default="bench/results", help="folder of quality[-adam].png")
    args = parser.parse_args()
    datasets = args.datasets.split(",")
    strategies = args.strategies.split(",")
    unknown = {*datasets} - DATASETS.keys() | {*strategies} - {*STRATEGIES}
    if unknown:
        parser.error(f"unknown dataset or strategy: {', '.join(sorted(unknown))}")
    if args.seeds < 1 or args.trials < 2:
        parser.error("--seeds must be at least 1 and --trials at least 2 (two stages)")
    targets = parse_targets(args.target)
    use_every_core()  # as `caviar run` does
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    specs = {
        (dataset, strategy, seed): build_spec(
            strategy, dataset, seed, args.trials, args.epochs, **_strategy_options(args)
        )
        for seed in range(args.seeds)
        for dataset in datasets
        for strategy in strategies
    }
    grid_spec = build_spec(
        "grid", datasets[0], 0, args.trials, args.epochs, **_strategy_options(args)
    )
    grid = grid_points(grid_spec, args.trials)
    workload = describe_workload(args, datasets, strategies, targets, grid)
    info = machine()
    print(f"machine: {info}")
    print(
        f"workload: {', '.join(datasets)}; strategies {', '.join(strategies)}; seeds "
        f"0..{args.seeds - 1}; {args.trials} trials × {args.epochs} epochs = "
        f"{args.trials * args.epochs} trial-epochs each, asked {args.batch} at a time; MLP "
        f"256-256 relu, optimizer {args.optimizer}, minibatch 128; lr log [1e-4, 1], "
        f"1-β log [1e-3, 1e-1], "
        f"L2 log [1e-6, 1e-2]; grid {workload['grid_sizes']}; coarse_to_fine "
        f"{args.trials // 2}+{args.trials - args.trials // 2} trials, keep_top "
        f"{workload['coarse_to_fine_keep_top']}; hyperband cap {workload['hyperband_trial_cap']} "
        f"trials; targets {workload['targets']}",
        flush=True,
    )

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'quality.db'}"
        upgrade(url)
        for dataset in datasets:
            warm_up(url, dataset, args.batch, args.optimizer)
        for number, ((dataset, strategy, _), spec) in enumerate(specs.items(), start=1):
            budget = TrialEpochBudget(args.trials * args.epochs, args.epochs, args.batch)
            strategy_grid = grid if strategy == "grid" else None
            row = run_one(url, spec, strategy, budget, targets[dataset], strategy_grid)
            rows.append(row)
            print(f"[{number}/{len(specs)}] {_progress(row)}", file=sys.stderr, flush=True)

    summary = summarise(rows)
    print_summary(summary, targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "quality.png" if args.optimizer == "momentum" else f"quality-{args.optimizer}.png"
    plot(rows, summary, out / name)
    print(f"\nplot: {out / name}")
    print(
        json.dumps(
            {
                "benchmark": "quality",
                "machine": info,
                "workload": workload,
                "results": rows,
                "summary": summary,
            }
        )
    )


def _progress(row: dict[str, Any]) -> str:
    test = "-" if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}"
    reached = row["time_to_target_s"]
    target = "not reached" if reached is None else f"reached at {reached:.1f} s"
    return (
        f"{row['dataset']} {row['strategy']} seed {row['seed']}: test {test}, "
        f"{row['trial_epochs']}/{row['trial_epoch_budget']} trial-epochs, "
        f"{row['wall_s']:.1f} s, target {target}"
    )


if __name__ == "__main__":
    main()
