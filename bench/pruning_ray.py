"""The Ray Tune ASHA contender of `bench.pruning`, run by the benchmark in its own virtualenv.

    <ray-venv>/bin/python bench/pruning_ray.py DATA.npz --budget-s 120 --epochs 20 --seed S
        --target 0.65 [--min-epochs 1] [--reduction-factor 3]

Imports only NumPy, PyTorch and Ray (never Caviar): Ray Tune's `ASHAScheduler` (grace period
`--min-epochs`, `--reduction-factor`, max_t `--epochs`, on the dev accuracy) over a per-trial
PyTorch trainable on the CPU, `bench/pruning_torch.py`'s loop (`epochs_of`) over the same
mixed-shape space, random search (`BasicVariantGenerator`, seeded), 10,000 samples and
`time_budget_s`. Ray starts on this machine's cores (one trial per core, one torch thread each),
reusing its actors between trials (`reuse_actors`: else every trial pays a new process and its
torch import, about 5 s here).
The clock starts before `ray.init`, and the tuner gets what is left of `--budget-s`. Prints one
JSON line: wall time, the time until a trial first reached `--target` dev accuracy (None:
never), trials started, trials that ran all epochs, and the picked trial's (best dev, as
`ResultGrid.get_best_result` picks it) dev and test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

SAMPLES = 10_000


def trainable(config: dict) -> None:
    """One trial: train, reporting after every epoch; stopped by ASHA or the time budget."""
    # ray is in the benchmark's own venv only; pruning_torch is the sibling script.
    import torch
    from pruning_torch import epochs_of, hparams, load  # type: ignore[import-not-found]
    from ray.tune import report  # type: ignore[import-not-found]

    torch.set_num_threads(1)
    data = load(config["data"])
    seed = config["seed"]
    for epoch, dev, best, test in epochs_of(hparams(config, seed), data, config["epochs"]):
        diverged = math.isnan(dev)
        report(
            {
                "dev_accuracy": 0.0 if diverged else dev,
                "best_dev": max(best, 0.0),
                "test_at_best": test,
                "epoch": epoch,
                "diverged": diverged,
                "at": time.time(),
            }
        )
        if diverged:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.65)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=3)
    args = parser.parse_args()

    start = time.time()
    import ray  # type: ignore[import-not-found]  # in the benchmark's own venv only
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler  # type: ignore[import-not-found]
    from ray.tune.search.basic_variant import BasicVariantGenerator  # type: ignore[import-not-found]

    here = str(Path(__file__).resolve().parent)
    cpus = os.cpu_count() or 1
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": here}},
    )
    space = {
        "hidden_units": tune.lograndint(32, 513),
        "hidden_layers": tune.randint(1, 4),
        "optimizer": tune.choice(["momentum", "adam"]),
        "learning_rate": tune.loguniform(1e-4, 1.0),
        "one_minus_momentum": tune.loguniform(1e-3, 1e-1),
        "l2": tune.loguniform(1e-6, 1e-2),
        "seed": tune.randint(0, 2**31 - 1),
        "data": str(Path(args.data).resolve()),
        "epochs": args.epochs,
    }
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=args.epochs,
        grace_period=args.min_epochs,
        reduction_factor=args.reduction_factor,
    )
    with tempfile.TemporaryDirectory() as storage:
        run_config = tune.RunConfig(storage_path=storage, verbose=0)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="dev_accuracy",
                mode="max",
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=args.seed, max_concurrent=cpus),
                num_samples=SAMPLES,
                reuse_actors=True,
                time_budget_s=max(1.0, args.budget_s - (time.time() - start)),
            ),
            run_config=run_config,
        )
        grid = tuner.fit()
        wall = time.time() - start
        frames = [r.metrics_dataframe for r in grid if r.metrics_dataframe is not None]
        frames = [f for f in frames if len(f)]
        hits = [f["at"][f["dev_accuracy"] >= args.target].min() for f in frames]
        hits = [h for h in hits if not math.isnan(h)]
        full = sum(int(f["epoch"].max()) >= args.epochs for f in frames)
        best = grid.get_best_result(metric="best_dev", mode="max", scope="last") if frames else None
    ray.shutdown()
    print(
        json.dumps(
            {
                "wall_s": wall,
                "time_to_target_s": min(hits) - start if hits else None,
                "trials_started": len(frames),
                "complete": full,
                "pruned": len(frames) - full,
                "picked_dev_accuracy": float(best.metrics["best_dev"]) if best else None,
                "picked_test_accuracy": float(best.metrics["test_at_best"]) if best else None,
            }
        )
    )


if __name__ == "__main__":
    main()
