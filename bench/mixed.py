"""Trials of mixed shapes: Caviar's bucket strategies against per-trial loops, side by side.

    python -m bench.mixed [--trials 32] [--epochs 20] [--rounds 2]
                          [--contenders caviar-auto,caviar-auto-serial,caviar-exact,...]

Workload: a random search of `--trials` trials on MNIST-1D (4000 train / 1000 dev / 1250 test),
minibatch 128, `--epochs` epochs, ReLU, searching the width (32–512, log, int), the number of
hidden layers (1–3), the optimizer (momentum or Adam), the learning rate (log-uniform in
[1e-4, 1]), 1-β (log-uniform in [1e-3, 1e-1]) and L2 (log-uniform in [1e-6, 1e-2]). Contenders,
each in a fresh process, in turn (A B C D E A B C D E …):

- caviar-auto, caviar-exact, caviar-single: the real path (a spec → Optuna on SQLite →
  `search.runner.run_search` → the planner → the engine), cold, with `CAVIAR_BUCKETS` set to the
  strategy; the wall time includes the single test of the best trial; caviar-auto-serial is
  caviar-auto with `CAVIAR_COMPILE_AHEAD=0` (each bucket compiles when its training starts,
  instead of in the background while the buckets before it train); caviar-auto-cached is
  caviar-auto with a persistent compilation cache (`CAVIAR_COMPILE_CACHE`) that an untimed
  search of the same space with another seed filled (a fresh copy of it each round): a user's
  next search of a space, whose planner may reuse the buckets of the last one;
- flax: a per-trial Flax loop (`bench.engine.train_flax_trial`) on exactly the configurations
  Caviar sampled;
- torch: a per-trial PyTorch loop on the CPU (`bench/peers_torch.py --configs`) on the same
  configurations, in the virtualenv `bench.peers` creates.

Figures: wall time, its ratio to caviar-auto's, compiles (XLA programs built in the process),
buckets and padding waste (padded ÷ real FLOPs), median dev accuracy and the picked trial's test
accuracy, real GFLOP/s and their share of this machine's float32 matmul peak. Prints a table and
a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import chosen_contenders, machine, median, print_table, run_contender
from bench.engine import BATCH, summarise, train_flax_trial
from bench.peers import split_sizes, torch_python, write_data

#: The Caviar contenders: the environment of each one's process.
CAVIAR_ENV = {
    "caviar-auto": {"CAVIAR_BUCKETS": "auto"},
    "caviar-auto-serial": {"CAVIAR_BUCKETS": "auto", "CAVIAR_COMPILE_AHEAD": "0"},
    "caviar-auto-cached": {"CAVIAR_BUCKETS": "auto"},  # and a warm CAVIAR_COMPILE_CACHE
    "caviar-exact": {"CAVIAR_BUCKETS": "exact"},
    "caviar-single": {"CAVIAR_BUCKETS": "single"},
}
CONTENDERS = (*CAVIAR_ENV, "flax", "torch")
SEED = 0
#: The seed of the untimed search that fills caviar-auto-cached's compilation cache.
WARMING_SEED = 1

#: The mixed-shape space (widths, depths, optimizers), as spec lines.
MIXED_SPACE = f"""space:
  learning_rate: {{low: 1.0e-4, high: 1.0, scale: log}}
  momentum: {{low: 0.9, high: 0.999, scale: one_minus_log}}
  l2: {{low: 1.0e-6, high: 1.0e-2, scale: log}}
  hidden_units: {{low: 32, high: 512, scale: log, type: int}}
  hidden_layers: {{low: 1, high: 3, type: int}}
  optimizer: {{choices: [momentum, adam]}}
fixed: {{batch_size: {BATCH}, activation: relu}}
"""


def spec_text(data: Path, trials: int, epochs: int, seed: int = SEED) -> str:
    """The Caviar spec of the workload."""
    return f"""
name: mixed
dataset: {{path: {data}}}
budget: {{trials: {trials}, epochs: {epochs}}}
sampler: random
seed: {seed}
{MIXED_SPACE}"""


def real_gflop(configs: list[dict], epochs_done: list[int], train: int, dev: int) -> float:
    """FLOPs the trials really need: each trial's own shape, epochs it trained."""
    from caviar.models.bucket import Shape, epoch_flops

    total = 0
    for config, epochs in zip(configs, epochs_done, strict=True):
        shape = Shape(40, 10, tuple(config["hidden"]), batch_size=BATCH)
        total += epochs * epoch_flops(shape, train, dev)
    return total / 1e9


# --- contenders, each in its own process ------------------------------------------------------


def run_caviar(data: Path, trials: int, epochs: int, workdir: Path, seed: int = SEED) -> dict:
    """Contender: `caviar run`'s path with the strategy of `$CAVIAR_BUCKETS`."""
    import jax

    from caviar.db.migrate import upgrade
    from caviar.db.storage import optuna_storage
    from caviar.search.runner import run_search, search_trials, start_search
    from caviar.search.spec import parse_spec

    compiles: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration_secs, **_: (
            compiles.append(duration_secs) if event.endswith("backend_compile_duration") else None
        )
    )
    plans = _PlanRecorder()
    logging.getLogger("caviar.search.trials").addHandler(plans)
    logging.getLogger("caviar.search.trials").setLevel(logging.INFO)

    spec = parse_spec(spec_text(data, trials, epochs, seed))
    url = f"sqlite:///{workdir / 'caviar.db'}"
    upgrade(url)
    storage = optuna_storage(url)
    start = time.perf_counter()
    result = run_search(url, start_search(url, spec))
    wall = time.perf_counter() - start
    found = search_trials(storage, spec, result.studies)
    epochs_done = [t.trial.user_attrs.get("epochs", 0) for t in found]
    devs = [t.trial.value if t.trial.value is not None else np.nan for t in found]
    configs = [
        {
            "hidden": [int(t.params["hidden_units"])] * int(t.params["hidden_layers"]),
            "optimizer": t.params["optimizer"],
            "learning_rate": float(t.params["learning_rate"]),
            "momentum": float(t.params["momentum"]),
            "beta2": float(t.params["beta2"]),
            "l2": float(t.params["l2"]),
            "seed": t.trial.number,
        }
        for t in found
    ]
    sizes = split_sizes(data)
    assert result.best is not None  # the search completed trials
    row = summarise(
        wall, epochs_done, devs, None, *sizes, selected_test=result.best["test_accuracy"]
    )
    padded = sum(p.padded_flops for p in plans.plans)
    return {
        **row,
        "gflop": real_gflop(configs, epochs_done, *sizes),
        "compiles": len(compiles),
        "compile_s": sum(compiles),
        "buckets": sum(len(p.assignments) for p in plans.plans),
        "cached_buckets": sum(a.cached for p in plans.plans for a in p.assignments),
        "padding_waste": padded / sum(p.real_flops for p in plans.plans),
        "configs": configs,
    }


class _PlanRecorder(logging.Handler):
    """Keeps the plan of every batch the worker logs."""

    def __init__(self) -> None:
        super().__init__()
        self.plans: list = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "plan"):
            self.plans.append(record.plan)


def run_flax(data: Path, configs: Path, epochs: int) -> dict:
    """Contender: one Flax model and jitted step per configuration."""
    from caviar.models.data import load_dataset

    ds = load_dataset({"path": str(data)})
    drawn = json.loads(configs.read_text())
    start = time.perf_counter()
    outcomes = [train_flax_trial(hp, ds, epochs) for hp in drawn]
    wall = time.perf_counter() - start
    epochs_done, devs, tests = (list(column) for column in zip(*outcomes, strict=True))
    sizes = split_sizes(data)
    row = summarise(wall, epochs_done, devs, tests, *sizes)
    return {**row, "gflop": real_gflop(drawn, epochs_done, *sizes)}


def run_torch(data: Path, configs: Path, epochs: int) -> dict:
    """Contender: `bench/peers_torch.py --configs` in the PyTorch virtualenv."""
    script = Path(__file__).with_name("peers_torch.py")
    completed = subprocess.run(
        [torch_python(), script, str(data), "--configs", str(configs), "--epochs", str(epochs)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the PyTorch contender failed:\n{completed.stderr[-3000:]}")
    raw = json.loads(completed.stdout.strip().splitlines()[-1])
    sizes = split_sizes(data)
    row = summarise(raw["wall_s"], raw["epochs"], raw["devs"], raw["tests"], *sizes)
    return {**row, "gflop": real_gflop(json.loads(configs.read_text()), raw["epochs"], *sizes)}


# --- the side-by-side run ---------------------------------------------------------------------


def warm_cache(data: Path, trials: int, epochs: int, cache: Path, keep: Path) -> None:
    """Fill `cache` with an untimed caviar-auto search of the space with `WARMING_SEED`, and keep
    a copy of it in `keep`."""
    args = ["--data", str(data), "--trials", str(trials), "--epochs", str(epochs)]
    args += ["--contender", "caviar", "--seed", str(WARMING_SEED)]
    run_contender(
        "bench.mixed", args, {"CAVIAR_BUCKETS": "auto", "CAVIAR_COMPILE_CACHE": str(cache)}
    )
    shutil.copytree(cache, keep)


def one_round(
    contenders: list[str], data: Path, trials: int, epochs: int, configs: Path, caches: Path
) -> dict:
    """Every contender once, in turn, each in a fresh process. The first Caviar contender writes
    the configurations the per-trial loops train (the same every round: the sampler is seeded);
    caviar-auto-cached starts from the warm cache, restored from its copy (at the path it was
    filled at: JAX's cache keys hold the cache's path)."""
    common = ["--data", str(data), "--trials", str(trials), "--epochs", str(epochs)]
    results: dict[str, dict] = {}
    for name in contenders:
        if name in CAVIAR_ENV:
            args = [*common, "--contender", "caviar"]
            env = CAVIAR_ENV[name]
            if name == "caviar-auto-cached":
                shutil.rmtree(caches / "cache", ignore_errors=True)
                shutil.copytree(caches / "warm", caches / "cache")
                env = {**env, "CAVIAR_COMPILE_CACHE": str(caches / "cache")}
            results[name] = run_contender("bench.mixed", args, env)
            configs.write_text(json.dumps(results[name].pop("configs")))
        elif name == "torch":
            results[name] = run_torch(data, configs, epochs)
        else:
            args = [*common, "--contender", name, "--configs", str(configs)]
            results[name] = run_contender("bench.mixed", args)
        print(f"  {name}: {results[name]['wall_s']:.1f} s", file=sys.stderr)
    return results


def table(runs: dict[str, list[dict]], trials: int, peak: float) -> list[dict]:
    """Medians over rounds per contender, with wall time relative to caviar-auto."""
    reference = median([r["wall_s"] for r in runs.get("caviar-auto", [])] or [np.nan])
    rows = []
    for name, results in runs.items():
        wall = median([r["wall_s"] for r in results])
        gflops = median([r["gflop"] / r["wall_s"] for r in results])

        def figure(key: str, results: list[dict] = results) -> float | None:
            values = [r[key] for r in results if r.get(key) is not None]
            return median(values) if values else None

        rows.append(
            {
                "contender": name,
                "wall_s": wall,
                "wall_over_auto": wall / reference,
                "compiles": figure("compiles"),
                "compile_s": figure("compile_s"),
                "buckets": figure("buckets"),
                "cached_buckets": figure("cached_buckets"),
                "padding_waste": figure("padding_waste"),
                "selected_test_acc": figure("selected_test_accuracy"),
                "median_dev_acc": figure("median_dev_accuracy"),
                "gflop_per_s": gflops,
                "share_of_peak": gflops / peak,
                "diverged": results[-1]["diverged"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="contenders run in turn, N times")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.contender:  # inside a contender's own process
        data = Path(args.data)
        if args.contender == "caviar":
            from caviar.models.runtime import enable_compilation_cache, use_every_core

            use_every_core()  # as `caviar run` does, with its compilation cache if set
            if os.environ.get("CAVIAR_COMPILE_CACHE"):
                enable_compilation_cache(os.environ["CAVIAR_COMPILE_CACHE"])
            with tempfile.TemporaryDirectory() as workdir:
                out = run_caviar(data, args.trials, args.epochs, Path(workdir), args.seed)
        else:
            out = run_flax(data, Path(args.configs), args.epochs)
        print(json.dumps(out))
        return

    contenders = chosen_contenders(parser, args.contenders, CONTENDERS)
    if not contenders[0].startswith("caviar-"):
        parser.error("the first contender must be a Caviar one: it samples the configurations")
    if "torch" in contenders:
        torch_python()  # create its virtualenv before any timing
    from caviar.models.runtime import matmul_peak_gflops

    peak = matmul_peak_gflops()
    info = machine()
    print(f"machine: {info}")
    print(
        f"workload: {args.trials} trials, MNIST-1D 4000 train / 1000 dev / 1250 test, widths "
        f"32-512 (log, int), 1-3 hidden layers, relu, momentum or adam, batch {BATCH}, "
        f"{args.epochs} epochs, random search over log lr [1e-4, 1], log 1-β [1e-3, 1e-1], "
        f"log L2 [1e-6, 1e-2]; {args.rounds} rounds; float32 matmul peak {peak:.0f} GFLOP/s"
    )
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as directory:
        data = write_data(Path(directory))
        configs = Path(directory) / "configs.json"
        caches = Path(directory)
        if "caviar-auto-cached" in contenders:
            print(f"warming a compilation cache (seed {WARMING_SEED}, untimed)", file=sys.stderr)
            warm_cache(data, args.trials, args.epochs, caches / "cache", caches / "warm")
        for number in range(1, args.rounds + 1):
            print(f"round {number}/{args.rounds}", file=sys.stderr)
            for name, result in one_round(
                contenders, data, args.trials, args.epochs, configs, caches
            ).items():
                runs.setdefault(name, []).append(result)
    rows = table(runs, args.trials, peak)
    print_table(rows, list(rows[0]))
    print(
        json.dumps(
            {
                "benchmark": "mixed",
                "machine": info,
                "peak_gflops": peak,
                "trials": args.trials,
                "epochs": args.epochs,
                "rounds": args.rounds,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
