"""Caviar's `train_batch` against the usual per-trial loop, on one workload, side by side.

    python -m bench.engine [--trials 32] [--epochs 20] [--rounds 1] [--group-sizes 2,4,8,32]
                           [--cpu-devices 1,2] [--dispatch lockstep,ahead] [--callback-ms 10]

Workload: MNIST-1D (4000 train / 1000 dev / 1250 test), MLP 40→256→256→10 ReLU, SGD with
momentum (v = β·v + (1-β)·dW), minibatch 128, learning rate log-uniform in [1e-4, 1], 1-β
log-uniform in [1e-3, 1e-1], L2 log-uniform in [1e-6, 1e-2]; both contenders get the same
hyperparameters and the same update rule. Every contender runs in a fresh process, so each pays
its own compilation; "warm cache" is a second Caviar process reusing the persistent
compilation cache of the first. On a CPU, Caviar splits the cores into one JAX device each, as
`caviar run` and workers do; `--cpu-devices 1,2` compares device counts (`CAVIAR_CPU_DEVICES`).
`--callback-ms` makes every contender wait that long after each epoch's report, as a worker's
database round trip does (Caviar once per round of its program, the loop once per trial-epoch);
`--dispatch lockstep,ahead` compares Caviar with rounds dispatched ahead of the report or not
(`CAVIAR_DISPATCH_AHEAD`). Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from typing import cast

import numpy as np

from bench.common import chosen_contenders, machine, median, print_table, run_contender

HIDDEN = (256, 256)
BATCH = 128
DATASET = {"name": "mnist1d", "samples": 6250}  # 4000 train / 1000 dev / 1250 test
#: `--dispatch` modes, as `CAVIAR_DISPATCH_AHEAD` values.
DISPATCH = {"lockstep": "0", "ahead": "1"}


def sample_hparams(trials: int, seed: int) -> list[dict]:
    """The workload's random search: log-uniform learning rate, 1-β and L2."""
    rng = np.random.default_rng(seed)
    return [
        {
            "learning_rate": float(10 ** rng.uniform(-4, 0)),
            "momentum": float(1 - 10 ** rng.uniform(-3, -1)),
            "l2": float(10 ** rng.uniform(-6, -2)),
            "seed": i,
        }
        for i in range(trials)
    ]


def training_gflop(epochs_per_trial: list[int], train: int, dev: int) -> float:
    """FLOPs actually spent: 3× forward per training example (forward + backward), 1× on dev."""
    return sum(epochs_per_trial) * epoch_gflop(HIDDEN[0], train, dev)


def epoch_gflop(width: int, train: int, dev: int) -> float:
    """GFLOP of one trial-epoch of the workload's MLP with hidden layers of `width` units:
    3× forward per training example in full minibatches, 1× per dev example."""
    from caviar.models.train import Shape

    shape = Shape(40, 10, (width,) * len(HIDDEN), optimizer="momentum", batch_size=BATCH)
    return (3 * shape.forward_flops(train // BATCH * BATCH) + shape.forward_flops(dev)) / 1e9


def run_caviar(trials: int, epochs: int, group_size: int, callback_s: float = 0.0) -> dict:
    """Contender: one `train_batch` call for all trials (groups of `group_size` per program),
    waiting `callback_s` after each round's report."""
    from caviar.models.data import load_dataset
    from caviar.models.train import Shape, TrainData, evaluate, train_batch

    ds = load_dataset(DATASET)
    hparams = sample_hparams(trials, seed=0)
    start = time.perf_counter()
    data = TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)
    shape = Shape(ds.num_features, ds.num_outputs, HIDDEN, optimizer="momentum", batch_size=BATCH)
    result = train_batch(
        shape,
        hparams,
        data,
        epochs=epochs,
        group_size=group_size,
        callback=(lambda _: time.sleep(callback_s)) if callback_s else None,
    )
    wall = time.perf_counter() - start
    tests = [
        evaluate(shape, result.trial_variables(i), ds.x_test, ds.y_test)["accuracy"]
        if t.status != "diverged" and t.best_epoch
        else float("nan")
        for i, t in enumerate(result.trials)
    ]
    devs = [
        t.best.get("dev_accuracy", float("nan")) if t.status != "diverged" else float("nan")
        for t in result.trials
    ]
    trial_epochs = [t.epochs for t in result.trials]
    traffic = result.traffic
    return {
        **summarise(wall, trial_epochs, devs, tests, len(ds.y_train), len(ds.y_dev)),
        "launches_per_trial_epoch": (traffic.epoch_calls + traffic.slot_writes) / sum(trial_epochs),
        "host_reads_per_round": traffic.host_reads / traffic.rounds,
    }


def run_per_trial(trials: int, epochs: int, callback_s: float = 0.0) -> dict:
    """Contender: the usual loop, a Flax model and a jitted train step per trial, waiting
    `callback_s` after each epoch."""
    from caviar.models.data import load_dataset

    ds = load_dataset(DATASET)
    hparams = sample_hparams(trials, seed=0)
    start = time.perf_counter()
    results = [train_flax_trial(hp, ds, epochs, callback_s) for hp in hparams]
    wall = time.perf_counter() - start
    epochs_done, devs, tests = (list(column) for column in zip(*results, strict=True))
    return summarise(wall, epochs_done, devs, tests, len(ds.y_train), len(ds.y_dev))


def train_flax_trial(
    hp: dict, ds, epochs: int, callback_s: float = 0.0
) -> tuple[int, float, float]:
    """One trial the usual way: a Flax MLP, a jitted train step, dev accuracy per epoch (then a
    wait of `callback_s`, as a report to a database would take).

    `hp` holds learning_rate, momentum (β, or Adam's β1), l2 and seed, and optionally `hidden`
    (default HIDDEN) and `optimizer` (momentum, the default, or adam). Returns (epochs trained,
    best dev accuracy, test accuracy at the best dev epoch); both accuracies are NaN if the loss
    diverged.
    """
    import jax
    import jax.numpy as jnp
    import optax  # type: ignore[import-untyped]  # optax ships no py.typed marker

    from caviar.models.mlp import MLP, init_variables, sum_squared_weights

    model = MLP(hidden=tuple(hp.get("hidden", HIDDEN)), num_outputs=ds.num_outputs)
    key = jax.random.PRNGKey(hp["seed"])
    params = init_variables(model, ds.num_features, key)["params"]
    if hp.get("optimizer", "momentum") == "adam":
        tx = optax.adam(hp["learning_rate"], b1=hp["momentum"], b2=hp.get("beta2", 0.999))
    else:
        tx = optax.chain(optax.ema(hp["momentum"], debias=False), optax.scale(-hp["learning_rate"]))
    opt_state = tx.init(params)
    l2 = hp["l2"]

    @jax.jit
    def train_step(params, opt_state, xb, yb):
        def cost(p):
            logits = model.apply({"params": p}, xb, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss + l2 / (2 * xb.shape[0]) * sum_squared_weights(p)

        loss, grads = jax.value_and_grad(cost)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params, x, y):
        # Without `mutable`, `apply` returns only the output (flax types it as maybe a tuple).
        logits = cast(jax.Array, model.apply({"params": params}, x, train=False))
        return jnp.mean(jnp.argmax(logits, -1) == y)

    rng = np.random.default_rng(0)
    best_dev, best_test, done = -1.0, float("nan"), 0
    for _ in range(epochs):
        order = rng.permutation(len(ds.y_train))
        for step in range(len(order) // BATCH):
            rows = order[step * BATCH : (step + 1) * BATCH]
            params, opt_state, loss = train_step(
                params, opt_state, ds.x_train[rows], ds.y_train[rows]
            )
        done += 1
        if not np.isfinite(float(loss)):
            return done, float("nan"), float("nan")
        dev = float(accuracy(params, ds.x_dev, ds.y_dev))
        if dev > best_dev:
            best_dev, best_test = dev, float(accuracy(params, ds.x_test, ds.y_test))
        if callback_s:
            time.sleep(callback_s)
    return done, best_dev, best_test


def summarise(
    wall: float,
    epochs_done: list[int],
    devs: list[float],
    tests: list[float] | None,
    train_size: int,
    dev_size: int,
    selected_test: float | None = None,
) -> dict:
    """A contender's figures from its trials' epochs, best dev and test accuracies (NaN: diverged).

    The selected trial is the one a search picks, best on dev. With `tests` None only that trial
    was tested (`selected_test`), as Caviar does: there are no best or median test figures.
    """
    devs_ = np.asarray(devs, float)
    row = {
        "wall_s": wall,
        "trials": len(devs),
        "gflop": training_gflop(epochs_done, train_size, dev_size),
        "median_dev_accuracy": float(np.nanmedian(devs_)),
        "diverged": int(np.sum(~np.isfinite(devs_))),
    }
    if tests is None:
        return {**row, "selected_test_accuracy": selected_test}
    tests_ = np.asarray(tests, float)
    return {
        **row,
        "selected_test_accuracy": float(tests_[int(np.nanargmax(devs_))]),
        "best_test_accuracy": float(np.nanmax(tests_)),
        "median_test_accuracy": float(np.nanmedian(tests_)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="contenders run in turn, N times")
    parser.add_argument("--group-sizes", default="4", help="Caviar group sizes to compare")
    parser.add_argument(
        "--cpu-devices", default="", help="Caviar CPU device counts to compare (default: per core)"
    )
    parser.add_argument(
        "--dispatch", default="", help="Caviar dispatch modes to compare: lockstep, ahead"
    )
    parser.add_argument(
        "--callback-ms", type=float, default=0.0, help="wait after each epoch's report"
    )
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--group-size", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.contender:  # inside a contender's own process
        if args.cache:
            from caviar.models.runtime import enable_compilation_cache

            enable_compilation_cache(args.cache)
        if args.contender == "caviar":
            from caviar.models.runtime import use_every_core

            use_every_core()  # as `caviar run` and workers do
            out = run_caviar(args.trials, args.epochs, args.group_size, args.callback_ms / 1e3)
        else:
            out = run_per_trial(args.trials, args.epochs, args.callback_ms / 1e3)
        print(json.dumps(out))
        return

    from caviar.models.runtime import matmul_peak_gflops

    peak = matmul_peak_gflops()
    info = machine()
    print(f"machine: {info}")
    print(
        f"workload: {args.trials} trials, MNIST-1D 4000 train, MLP 40→256→256→10 relu, "
        f"momentum SGD, batch {BATCH}, {args.epochs} epochs, a {args.callback_ms:g} ms wait per "
        f"report; float32 matmul peak {peak:.0f} GFLOP/s"
    )
    common = ["--trials", str(args.trials), "--epochs", str(args.epochs)]
    common += ["--callback-ms", str(args.callback_ms)]
    group_sizes = [int(g) for g in args.group_sizes.split(",")]
    device_counts = args.cpu_devices.split(",") if args.cpu_devices else [""]
    dispatches = chosen_contenders(parser, args.dispatch, list(DISPATCH)) if args.dispatch else [""]
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for group, devices, dispatch in itertools.product(group_sizes, device_counts, dispatches):
            env = {"CAVIAR_CPU_DEVICES": devices} if devices else {}
            if dispatch:
                env["CAVIAR_DISPATCH_AHEAD"] = DISPATCH[dispatch]
            name = f"caviar g={group}" + (f" d={devices}" if devices else "")
            name += f" {dispatch}" if dispatch else ""
            with tempfile.TemporaryDirectory() as cache:
                caviar = [*common, "--contender", "caviar", "--group-size", str(group)]
                cold = run_contender("bench.engine", [*caviar, "--cache", cache], env)
                warm = run_contender("bench.engine", [*caviar, "--cache", cache], env)
            runs.setdefault(f"{name} (cold)", []).append(cold)
            runs.setdefault(f"{name} (warm cache)", []).append(warm)
        runs.setdefault("per-trial loop", []).append(
            run_contender("bench.engine", [*common, "--contender", "per-trial"])
        )

    baseline = median([r["wall_s"] for r in runs["per-trial loop"]])
    rows = []
    for name, results in runs.items():
        wall = median([r["wall_s"] for r in results])
        gflops = median([r["gflop"] / r["wall_s"] for r in results])
        rows.append(
            {
                "contender": name,
                "wall_s": wall,
                "trials_per_min": 60 * args.trials / wall,
                "speedup_vs_loop": baseline / wall,
                "selected_test_acc": median([r["selected_test_accuracy"] for r in results]),
                "median_test_acc": median([r["median_test_accuracy"] for r in results]),
                "gflop_per_s": gflops,
                "share_of_peak": gflops / peak,
                "diverged": results[-1]["diverged"],
                "launches_per_trial_epoch": results[-1].get("launches_per_trial_epoch"),
                "host_reads_per_round": results[-1].get("host_reads_per_round"),
            }
        )
    print_table(rows, list(rows[0]))
    print(json.dumps({"benchmark": "engine", "machine": info, "peak_gflops": peak, "rows": rows}))


if __name__ == "__main__":
    main()
