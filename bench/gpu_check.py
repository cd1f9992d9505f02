"""Prove the engine on an accelerator: CPU parity, compiles, throughput and out of memory.

    python -m bench.gpu_check [--out bench/results/gpu_check.json] [--quick] [--group-size N]

Needs only the repository and JAX (no database, Optuna study or server). Data: MNIST-1D. Parts:

1. parity: five trials of different widths, depths, activations and optimizers, trained in one
   bucket on the default backend and in a CPU subprocess (`JAX_PLATFORMS=cpu`), at matmul
   precision `highest` and `default` (each side in a process of its own): the largest relative
   difference of the dev loss over every trial and epoch;
2. compiles: a mixed-shape batch split into buckets by the planner, each bucket trained twice;
   per bucket the XLA compiles counted by `jax.monitoring` backend-compile events (the epoch
   program's must be exactly one the first time, nothing the second) and their seconds; float64
   is looked for in the StableHLO of every program compiled (`jax_dump_ir_to`) and in the
   dtypes of the kept weights;
3. throughput: trial-epochs per second of bench.mixed's mixed-shape space (width 32-512 log
   int, 1-3 hidden layers, momentum or Adam, log learning rate, 1-β and L2) for several trial
   counts, planned into buckets as workers do, against bench.engine's per-trial Flax loop on the
   same device (in its own process), with and without a callback sleeping 10 ms per epoch (a
   database round trip), and with that callback and rounds dispatched ahead of it; device
   utilisation from `nvidia-smi` every 0.5 s;
4. out of memory: on a GPU, a subprocess capped by `XLA_PYTHON_CLIENT_MEM_FRACTION` trains a
   bucket too large for the cap; the error must be caught, `is_out_of_memory` must say so, and the
   process must then train a small bucket. Skipped on the CPU (no cap to hit there).

On the CPU backend, or with `--quick`, the sizes are small. Prints the machine, the workload
and a table per part, writes all figures to `--out` and prints them as a final JSON line; exits
with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, print_table, run_contender
from bench.engine import BATCH, sample_hparams, train_flax_trial

#: Relative dev-loss difference allowed at `highest`: CPU against CPU must agree to rounding;
#: an accelerator's float32 kernels sum in other orders, which epochs of training amplify.
PARITY_TOLERANCE = {"cpu": 1e-5, "accelerator": 1e-3}

#: The parity trials: (hidden widths, activation, optimizer, hyperparameters).
PARITY_TRIALS: tuple[tuple[tuple[int, ...], str, str, dict[str, float]], ...] = (
    ((64,), "relu", "adam", {"learning_rate": 1e-3}),
    ((128, 64), "tanh", "momentum", {"learning_rate": 0.05}),
    ((32, 32, 32), "gelu", "rmsprop", {"learning_rate": 1e-3}),
    ((96, 48), "sigmoid", "adamw", {"learning_rate": 3e-3, "l2": 1e-4}),
    ((48,), "leaky_relu", "gd", {"learning_rate": 0.1}),
)

#: The bucket the out-of-memory part trains, and the memory cap of its process.
OOM_TRIALS, OOM_HIDDEN, OOM_MEM_FRACTION = 16, (4096, 4096), "0.02"

CALLBACK_SLEEP_S = 0.01
SAMPLE_EVERY_S = 0.5
NVIDIA_SMI = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
F64 = re.compile(r"[<x]f64\b")  # a float64 element type in MLIR: tensor<f64>, tensor<4xf64>


@dataclasses.dataclass(frozen=True)
class Workload:
    """The sizes of one run."""

    samples: int  # MNIST-1D examples: 64% train, 16% dev, 20% test
    parity_epochs: int
    compile_trials: int
    compile_epochs: int
    sizes: tuple[int, ...]  # trials per throughput measurement
    epochs: int  # per throughput trial
    loop_trials: int  # trials the per-trial loop trains (its rate does not depend on the count)


FULL = Workload(6250, 5, 16, 2, (32, 128, 512, 2048), 3, 8)
SMALL = Workload(2000, 3, 8, 1, (8, 32), 2, 4)


# --- what every part uses -----------------------------------------------------------------------


class CompileLog:
    """Every XLA compile of this process from `jax.monitoring`: (function name, seconds)."""

    def __init__(self) -> None:
        import jax

        self.events: list[tuple[str, float]] = []
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.events.append((str(kwargs.get("fun_name", "")), duration_secs))

    def since(self, mark: int) -> list[tuple[str, float]]:
        return self.events[mark:]


def epoch_compiles(events: Sequence[tuple[str, float]]) -> int:
    """How many of `events` compiled a bucket's epoch program."""
    return sum("train_epoch" in name for name, _ in events)


def machine_info() -> dict:
    """bench.common's machine (`cores`: the CPU count) plus the backend, device kinds and count."""
    import jax

    devices = jax.devices()
    return {
        **machine(),
        "backend": jax.default_backend(),
        "device_kinds": sorted({d.device_kind for d in devices}),
        "device_count": len(devices),
    }


def save_dataset(ds: Any, path: Path) -> None:
    """Write a `Dataset`'s fields to an .npz file, for the subprocesses."""
    np.savez(path, **{f.name: getattr(ds, f.name) for f in dataclasses.fields(ds)})


def read_dataset(path: Path) -> Any:
    """The `Dataset` `save_dataset` wrote."""
    from caviar.models.data import Dataset

    with np.load(path) as npz:
        return Dataset(**{k: npz[k].item() if npz[k].ndim == 0 else npz[k] for k in npz.files})


def train_data(ds: Any) -> Any:
    from caviar.models.train import TrainData

    return TrainData.from_arrays(ds.x_train, ds.y_train, ds.x_dev, ds.y_dev)


def mixed_configs(trials: int, seed: int = 0) -> list[dict]:
    """bench.mixed's space: bench.engine's learning rate, 1-β and L2, plus a width log-uniform
    in 32-512 (int), 1-3 hidden layers and momentum or Adam. A prefix of a longer draw is the
    shorter draw."""
    rng = np.random.default_rng([seed, 1])
    configs = []
    for hp in sample_hparams(trials, seed):
        width = round(float(np.exp(rng.uniform(np.log(32), np.log(512)))))
        depth = int(rng.integers(1, 4))
        optimizer = str(rng.choice(["momentum", "adam"]))
        configs.append({**hp, "hidden": [width] * depth, "optimizer": optimizer})
    return configs


def shape_of(config: Mapping[str, Any], ds: Any) -> Any:
    from caviar.models.train import Shape

    return Shape(
        ds.num_features,
        ds.num_outputs,
        tuple(config["hidden"]),
        optimizer=config["optimizer"],
        batch_size=BATCH,
    )


def engine_hparams(config: Mapping[str, Any]) -> dict:
    """A configuration's continuous hyperparameters, as `train_batch` takes them."""
    return {k: config[k] for k in ("learning_rate", "momentum", "l2", "seed")}


class Utilisation:
    """`nvidia-smi` sampled every 0.5 s in a background thread; nothing where it is absent."""

    def __init__(self) -> None:
        self.command = shutil.which("nvidia-smi")
        self.samples: list[tuple[float, float]] = []  # (mean utilisation %, memory used MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            assert self.command is not None
            done = subprocess.run([self.command, *NVIDIA_SMI], capture_output=True, text=True)
            try:  # one line per GPU: "utilisation %, MiB used"; "[N/A]" where not reported
                rows = [[float(v) for v in line.split(",")] for line in done.stdout.splitlines()]
            except ValueError:
                rows = []
            if done.returncode == 0 and rows:
                util = [r[0] for r in rows]
                self.samples.append((sum(util) / len(util), sum(r[1] for r in rows)))
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> Utilisation:
        if self.command:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def summary(self) -> dict:
        """Mean utilisation and peak memory over the samples; null (not a GPU) without them."""
        if not self.samples:
            return {"gpu_util_pct": None, "gpu_mem_mib": None}
        return {
            "gpu_util_pct": float(np.mean([u for u, _ in self.samples])),
            "gpu_mem_mib": max(m for _, m in self.samples),
        }


# --- 1. parity -------------------------------------------------------------------------------


def parity_worker(data: Path, precision: str, epochs: int) -> dict:
    """In its own process: the parity trials in one bucket at `precision`, their dev losses."""
    import jax

    from caviar.models.runtime import set_matmul_precision
    from caviar.models.train import Bucket, Shape, train_batch

    set_matmul_precision(precision)
    ds = read_dataset(data)
    shapes = [
        Shape(ds.num_features, ds.num_outputs, hidden, activation, optimizer=opt, batch_size=BATCH)
        for hidden, activation, opt, _ in PARITY_TRIALS
    ]
    hparams = [{**hp, "seed": i} for i, (*_, hp) in enumerate(PARITY_TRIALS)]
    bucket = Bucket.envelope(shapes)
    result = train_batch(shapes, hparams, train_data(ds), epochs=epochs, bucket=bucket)
    return {
        "backend": jax.default_backend(),
        "bucket": bucket.describe(),
        "dev_loss": [[epoch["dev_loss"] for epoch in t.history] for t in result.trials],
    }


def relative_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """The largest |a - b| / |b| over epochs (0 where both are equal, NaN or not; infinite where
    one side trained more epochs, having diverged later)."""
    if len(a) != len(b):
        return float("inf")
    x, y = np.asarray(a, float), np.asarray(b, float)
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = np.abs(x - y) / np.maximum(np.abs(y), 1e-30)
    return float(np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf)).max(initial=0.0))


def check_parity(data: Path, epochs: int, backend: str) -> dict:
    """The parity trials on the default backend and on the CPU, both precisions, all at once."""
    sides = {"device": {}, "cpu": {"JAX_PLATFORMS": "cpu"}}
    args = ["--parity-worker", "--data", str(data), "--epochs", str(epochs), "--precision"]
    jobs = [(precision, side) for precision in ("highest", "default") for side in sides]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            (p, side): pool.submit(run_contender, "bench.gpu_check", [*args, p], sides[side])
            for p, side in jobs
        }
        out = {key: future.result() for key, future in futures.items()}
    rows = []
    for trial, (hidden, activation, optimizer, _) in enumerate(PARITY_TRIALS):
        losses = {key: o["dev_loss"][trial] for key, o in out.items()}
        rows.append(
            {
                "trial": trial,
                "hidden": "x".join(map(str, hidden)),
                "activation": activation,
                "optimizer": optimizer,
                "dev_loss_device": losses["highest", "device"][-1],
                "dev_loss_cpu": losses["highest", "cpu"][-1],
                **{
                    f"rel_diff_{p}": relative_difference(losses[p, "device"], losses[p, "cpu"])
                    for p in ("highest", "default")
                },
            }
        )
    worst = {p: max(r[f"rel_diff_{p}"] for r in rows) for p in ("highest", "default")}
    tolerance = PARITY_TOLERANCE["cpu" if backend == "cpu" else "accelerator"]
    return {
        "bucket": out["highest", "device"]["bucket"],
        "epochs": epochs,
        "device_backend": out["highest", "device"]["backend"],
        "reference_backend": out["highest", "cpu"]["backend"],
        "rows": rows,
        "max_rel_diff": worst,
        "tolerance_highest": tolerance,
        "ok": worst["highest"] <= tolerance,
    }


# --- 2. compiles -----------------------------------------------------------------------------


def check_compiles(ds: Any, data: Any, work: Workload, log: CompileLog, group_size: int) -> dict:
    """Each bucket of a planned mixed batch trained twice: its compiles, then none."""
    import jax

    from caviar.models.planner import plan
    from caviar.models.train import compiled_buckets, default_monitor, planning_costs, train_batch

    configs = mixed_configs(work.compile_trials, seed=1)
    shapes = [shape_of(c, ds) for c in configs]
    costs = planning_costs(
        data, epochs=work.compile_epochs, group_size=group_size, trials=len(shapes)
    )
    monitor = default_monitor("classification")
    assignments = plan(shapes, costs, compiled=compiled_buckets(data, monitor)).assignments
    rows, kept_dtypes = [], set()
    with tempfile.TemporaryDirectory() as dump:
        jax.config.update("jax_dump_ir_to", dump)
        try:
            for a in assignments:
                row: dict[str, Any] = {"bucket": a.bucket.describe(), "trials": len(a.members)}
                for run in ("first", "again"):
                    mark = len(log.events)
                    result = train_batch(
                        [shapes[i] for i in a.members],
                        [
                            {**engine_hparams(configs[i]), "seed": i + 1000 * (run == "again")}
                            for i in a.members
                        ],
                        data,
                        epochs=work.compile_epochs,
                        bucket=a.bucket,
                        group_size=group_size,
                    )
                    events = log.since(mark)
                    row[f"epoch_compiles_{run}"] = epoch_compiles(events)
                    row[f"xla_compiles_{run}"] = len(events)
                    row[f"compile_s_{run}"] = sum(s for _, s in events)
                    leaves = jax.tree_util.tree_leaves(result.kept)
                    kept_dtypes |= {str(np.asarray(leaf).dtype) for leaf in leaves}
                rows.append(row)
        finally:
            jax.config.update("jax_dump_ir_to", "")
        modules = sorted(Path(dump).glob("*.mlir"))
        with_f64 = [m.name for m in modules if F64.search(m.read_text())]
    one_each = all(r["epoch_compiles_first"] == 1 and r["xla_compiles_again"] == 0 for r in rows)
    return {
        "float64_check": "StableHLO of every program compiled here (jax_dump_ir_to) and the "
        "dtypes of every kept weight",
        "rows": rows,
        "modules_scanned": len(modules),
        "modules_with_f64": with_f64,
        "kept_dtypes": sorted(kept_dtypes),
        "one_compile_per_bucket": one_each,
        "no_float64": bool(modules) and not with_f64 and "float64" not in kept_dtypes,
    }


# --- 3. throughput ---------------------------------------------------------------------------


def database_round_trip(_report: Any) -> None:
    """The callback of a worker that writes each epoch to its database: it waits 10 ms."""
    time.sleep(CALLBACK_SLEEP_S)


def run_fused(
    ds: Any,
    data: Any,
    configs: list[dict],
    epochs: int,
    group_size: int,
    log: CompileLog,
) -> list[dict]:
    """The trials planned into buckets and trained bucket by bucket: without the 10 ms callback
    and with it, in lockstep, then the same with rounds dispatched ahead (each second run
    reuses the first's programs; those dispatched ahead are programs of their own, which keep
    their inputs)."""
    from caviar.models.planner import plan
    from caviar.models.train import compiled_buckets, default_monitor, planning_costs, train_batch

    shapes = [shape_of(c, ds) for c in configs]
    hparams = [engine_hparams(c) for c in configs]
    costs = planning_costs(data, epochs=epochs, group_size=group_size, trials=len(shapes))
    chosen = plan(shapes, costs, compiled=compiled_buckets(data, default_monitor("classification")))
    runs = []
    variants = [
        (callback, ahead) for ahead in (False, True) for callback in (None, database_round_trip)
    ]
    for callback, ahead in variants:
        mark = len(log.events)
        with Utilisation() as util:
            start = time.perf_counter()
            trial_epochs = 0
            for a in chosen.assignments:
                result = train_batch(
                    [shapes[i] for i in a.members],
                    [hparams[i] for i in a.members],
                    data,
                    epochs=epochs,
                    bucket=a.bucket,
                    group_size=group_size,
                    callback=callback,
                    ahead=ahead,
                )
                trial_epochs += sum(t.epochs for t in result.trials)
            wall = time.perf_counter() - start
        compile_s = sum(s for _, s in log.since(mark))
        runs.append(
            {
                "buckets": len(chosen.assignments),
                "padding_waste": chosen.waste,
                "wall_s": wall,
                "compile_s": compile_s,
                "trial_epochs": trial_epochs,
                **util.summary(),
            }
        )
    return runs


def loop_worker(data: Path, configs: Path, epochs: int) -> dict:
    """In its own process: bench.engine's per-trial Flax loop over the configurations."""
    log = CompileLog()
    ds = read_dataset(data)
    start = time.perf_counter()
    outcomes = [train_flax_trial(hp, ds, epochs) for hp in json.loads(configs.read_text())]
    return {
        "wall_s": time.perf_counter() - start,
        "compile_s": sum(s for _, s in log.events),
        "trial_epochs": sum(done for done, _, _ in outcomes),
    }


def check_throughput(
    ds: Any, data: Any, path: Path, work: Workload, log: CompileLog, group_size: int
) -> dict:
    """Trial-epochs per second of the fused engine at each size against the per-trial loop."""
    configs = path.with_name("loop-configs.json")
    configs.write_text(json.dumps(mixed_configs(work.loop_trials)))
    args = ["--loop-worker", "--data", str(path), "--configs", str(configs)]
    with Utilisation() as util:
        loop = run_contender("bench.gpu_check", [*args, "--epochs", str(work.epochs)])
    loop |= util.summary()
    loop_rate = loop["trial_epochs"] / loop["wall_s"]
    # In a loop, every epoch's round trip waits alone: it adds to the wall time.
    loop_cb_rate = loop["trial_epochs"] / (loop["wall_s"] + CALLBACK_SLEEP_S * loop["trial_epochs"])
    rows = []
    for size in work.sizes:
        plain, called, _, ahead = run_fused(
            ds, data, mixed_configs(size), work.epochs, group_size, log
        )
        rate = plain["trial_epochs"] / plain["wall_s"]
        rate_cb = called["trial_epochs"] / called["wall_s"]
        rate_cb_ahead = ahead["trial_epochs"] / ahead["wall_s"]
        rows.append(
            {
                "trials": size,
                "buckets": plain["buckets"],
                "padding_waste": plain["padding_waste"],
                "trial_epochs": plain["trial_epochs"],
                "compile_s": plain["compile_s"],
                "fused_tep_s": rate,
                "fused_steady_tep_s": plain["trial_epochs"]
                / (plain["wall_s"] - plain["compile_s"]),
                "fused_cb_tep_s": rate_cb,
                "fused_cb_ahead_tep_s": rate_cb_ahead,
                "ahead_gain": rate_cb_ahead / rate_cb,
                "loop_tep_s": loop_rate,
                "loop_cb_tep_s": loop_cb_rate,
                "speedup": rate / loop_rate,
                "speedup_cb": rate_cb / loop_cb_rate,
                "gpu_util_pct": plain["gpu_util_pct"],
                "gpu_mem_mib": plain["gpu_mem_mib"],
            }
        )
    largest = rows[-1]
    return {
        "epochs": work.epochs,
        "group_size": group_size,
        "loop": {**loop, "trials": work.loop_trials},
        "rows": rows,
        "utilisation": "nvidia-smi" if util.command else "not a GPU",
        "fused_beats_loop": largest["fused_tep_s"] > largest["loop_tep_s"],
    }


# --- 4. out of memory ------------------------------------------------------------------------


def oom_worker(data: Path) -> dict:
    """In a process with a capped memory: a bucket too large fails as out of memory, then a
    small one trains."""
    import jax

    from caviar.models.train import Shape, train_batch
    from caviar.search.trials import is_out_of_memory

    ds = read_dataset(data)
    small = Shape(ds.num_features, ds.num_outputs, (32,), batch_size=BATCH)
    large = dataclasses.replace(small, hidden=OOM_HIDDEN)
    stats = jax.devices()[0].memory_stats() or {}
    out: dict[str, Any] = {
        "mem_fraction": OOM_MEM_FRACTION,
        "bytes_limit": stats.get("bytes_limit"),
        "bucket": f"{OOM_TRIALS} trials of {'x'.join(map(str, OOM_HIDDEN))} adam",
        # weights, best weights and Adam's two moments, float32
        "state_bytes": OOM_TRIALS * 4 * 4 * large.num_parameters,
    }
    try:
        hparams = [{"seed": i} for i in range(OOM_TRIALS)]
        train_batch(large, hparams, train_data(ds), epochs=1)
        out |= {"raised": False, "error": None, "is_out_of_memory": False}
    except Exception as error:  # what a worker catches
        out |= {
            "raised": True,
            "error": f"{type(error).__name__}: {str(error)[:300]}",
            "is_out_of_memory": is_out_of_memory(error),
        }
    gc.collect()
    after = train_batch(small, [{"seed": 0}, {"seed": 1}], train_data(ds), epochs=1)
    losses = [t.history[-1]["dev_loss"] for t in after.trials]
    return out | {"recovered": bool(np.all(np.isfinite(losses))), "dev_loss_after": losses}


def check_out_of_memory(path: Path, backend: str) -> dict:
    """The out-of-memory worker in a capped subprocess; skipped on the CPU."""
    if backend == "cpu":
        return {"status": "skipped on cpu", "ok": True}
    env = {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": OOM_MEM_FRACTION,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "true",
    }
    try:
        out = run_contender("bench.gpu_check", ["--oom-worker", "--data", str(path)], env)
    except RuntimeError as error:  # the process died instead of raising: no recovery to check
        return {"status": "worker failed", "error": str(error)[-1000:], "ok": False}
    ok = out["raised"] and out["is_out_of_memory"] and out["recovered"]
    return {"status": "ran", **out, "ok": ok}


# --- the command -----------------------------------------------------------------------------


def timed(check: Callable[..., dict], *args: Any) -> dict:
    """A part's figures and the seconds it took."""
    start = time.perf_counter()
    return {**check(*args), "seconds": time.perf_counter() - start}


def print_part(title: str, part: dict, rows: list[dict], notes: Mapping[str, Any]) -> None:
    print(f"\n{title} ({part['seconds']:.0f} s)")
    print_table(rows, list(rows[0]))
    for name, value in notes.items():
        print(f"  {name}: {value}")


def run_checks(args: argparse.Namespace) -> dict:
    """The four parts on this machine; prints a table per part and returns every figure."""
    import jax

    from caviar.models.data import load_dataset
    from caviar.models.runtime import matmul_peak_gflops, set_matmul_precision

    log = CompileLog()
    set_matmul_precision("highest")  # Caviar's default, as workers set it
    backend = jax.default_backend()
    work = SMALL if args.quick or backend == "cpu" else FULL
    info = machine_info()
    peak = matmul_peak_gflops()
    print(f"machine: {info}")
    print(
        f"workload: MNIST-1D {work.samples} examples (64% train / 16% dev / 20% test), batch "
        f"{BATCH}, matmul precision highest (parity also default), group size "
        f"{args.group_size}; parity {len(PARITY_TRIALS)} trials x {work.parity_epochs} epochs; "
        f"compiles {work.compile_trials} mixed trials x {work.compile_epochs} epochs; "
        f"throughput {', '.join(map(str, work.sizes))} mixed trials x {work.epochs} epochs, "
        f"per-trial loop on {work.loop_trials}; float32 matmul peak {peak:.0f} GFLOP/s"
    )
    ds = load_dataset({"name": "mnist1d", "samples": work.samples})
    data = train_data(ds)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "data.npz"
        save_dataset(ds, path)
        parity = timed(check_parity, path, work.parity_epochs, backend)
        print_part(
            f"1. parity: {parity['device_backend']} against {parity['reference_backend']}, "
            f"one bucket ({parity['bucket']}), {parity['epochs']} epochs",
            parity,
            parity["rows"],
            {"max relative dev-loss difference": parity["max_rel_diff"]},
        )
        compiles = timed(check_compiles, ds, data, work, log, args.group_size)
        print_part(
            "2. compiles: each bucket trained, then trained again",
            compiles,
            compiles["rows"],
            {
                "float64 looked for in": compiles["float64_check"],
                "modules scanned": compiles["modules_scanned"],
                "modules with f64": compiles["modules_with_f64"] or "none",
                "kept dtypes": compiles["kept_dtypes"],
            },
        )
        throughput = timed(check_throughput, ds, data, path, work, log, args.group_size)
        print_part(
            "3. throughput (tep_s: trial-epochs per second; steady: XLA compile seconds "
            "excluded; cb: 10 ms callback per epoch, warm programs; cb_ahead: the same with rounds "
            "dispatched ahead; loop_cb: computed, the loop waits for each round trip)",
            throughput,
            throughput["rows"],
            {
                "per-trial loop (same figures every row)": "{trials} trials, {wall_s:.1f} s, "
                "{compile_s:.1f} s of it compiling, {trial_epochs} trial-epochs".format(
                    **throughput["loop"]
                ),
                "per-trial loop GPU utilisation %": throughput["loop"]["gpu_util_pct"],
                "utilisation": throughput["utilisation"],
            },
        )
        oom = timed(check_out_of_memory, path, backend)
        shown = ("status", "bytes_limit", "state_bytes", "raised", "is_out_of_memory", "recovered")
        print_part(
            "4. out of memory",
            oom,
            [{k: oom[k] for k in (*shown, "ok") if k in oom}],
            {"error": oom["error"]} if oom.get("error") else {},
        )
    checks = {
        "parity_highest": parity["ok"],
        "one_compile_per_bucket": compiles["one_compile_per_bucket"],
        "no_float64": compiles["no_float64"],
        "fused_beats_loop": throughput["fused_beats_loop"],
        "out_of_memory": oom["ok"],
    }
    print(f"\nchecks: {checks}")
    return {
        "benchmark": "gpu_check",
        "machine": info,
        "peak_gflops": peak,
        "workload": dataclasses.asdict(work),
        "parity": parity,
        "compiles": compiles,
        "throughput": throughput,
        "out_of_memory": oom,
        "checks": checks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_check.json"))
    parser.add_argument("--quick", action="store_true", help="small sizes on any backend")
    parser.add_argument(
        "--group-size",
        type=int,
        help="trials per compiled call (default: the engine's for the backend)",
    )
    worker = parser.add_mutually_exclusive_group()
    for name in ("--parity-worker", "--loop-worker", "--oom-worker"):
        worker.add_argument(name, action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--configs", "--precision"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.parity_worker or args.loop_worker or args.oom_worker:  # inside a subprocess
        if args.parity_worker:
            out = parity_worker(Path(args.data), args.precision, args.epochs)
        elif args.loop_worker:
            out = loop_worker(Path(args.data), Path(args.configs), args.epochs)
        else:
            out = oom_worker(Path(args.data))
        print(json.dumps(out))
        return

    # GPU memory as nvidia-smi sees it (not a preallocated share), left to the subprocesses too.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from caviar.models.runtime import use_every_core
    from caviar.models.train import default_group_size

    use_every_core()  # as `caviar run` and workers do
    args.group_size = args.group_size or default_group_size()
    result = run_checks(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    sys.exit(0 if all(result["checks"].values()) else 1)


if __name__ == "__main__":
    main()
