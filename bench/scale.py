"""How cost grows with trials, training data, width, Optuna storage and API readers, as plots.

    python -m bench.scale [--only trials,data,width,storage,api] [--epochs 5] [--trials 32]
        [--trial-counts 32,128,512] [--train-sizes 4000,40000,200000]
        [--widths 64,128,256,512,1024] [--storage-trials 64] [--api-trials 128]
        [--api-clients 32] [--api-requests 50] [--out bench/results]

Base workload (as bench.engine): MNIST-1D, MLP 40→256→256→10 ReLU, SGD with momentum, minibatch
128, hyperparameters drawn as `bench.engine.sample_hparams` (seed 0), `--epochs` epochs, one
`train_batch` call with the default group size. Each training point runs in a fresh process, so
it pays its own compilation like a new worker; MNIST-1D is generated once per size beforehand
(not timed). Sections:

- trials: `--trial-counts` trials of one shape on 4000 training examples.
- data: `--trials` trials on `--train-sizes` training examples (dev and test are 20% each, so
  the dataset has train / 0.64 examples).
- width: `--trials` trials of two hidden layers of each of `--widths` units, 4000 examples.
- storage: no training; `--storage-trials` trials written to Caviar's Optuna storage as a worker
  writes them, in batches of 32 (ask, one heartbeat, sample learning rate, 1-momentum and L2
  on log scales, each epoch's reports in one transaction and a prune check per trial, the
  worker's user attributes, tell) on SQLite (a
  temporary file) and PostgreSQL, against the training time per trial of the trials point
  nearest `--trials`. A worker also writes a heartbeat every CAVIAR_HEARTBEAT_S (10 s) per
  running trial, timed here as `heartbeat_ms`.
- api: a real `caviar serve` on a free loopback port and PostgreSQL; one search holding
  `--api-trials` finished trials (written as above); `--api-clients` threads, each its own
  HTTP connection, send `--api-requests` requests of `GET /v1/searches/{id}` at once (after one
  untimed request each). The clients share this machine's cores with the server.

Training figures: `wall_s` is the whole `train_batch` call in a fresh process (compilation
included); `ms_per_trial_epoch` and `gflop_per_s` are measured after the first epoch (no
compilation), with 3× forward FLOPs per training example and 1× per dev example;
`share_of_peak` is against `models.runtime.matmul_peak_gflops()`.

Storage and api use (and wipe) the PostgreSQL database `caviar_bench`
(`CAVIAR_BENCH_POSTGRES_URL` to change, as for bench.pool). Prints the machine, the workload, a
table per section and a final JSON line; writes scale-{trials,data,width,storage,api}.png and
scale.json under `--out`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from optuna.trial import TrialState

from bench.common import machine, print_table, run_contender
from bench.engine import BATCH, DATASET, HIDDEN, epoch_gflop, sample_hparams

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from caviar.search.spec import SearchSpec

SECTIONS = ("trials", "data", "width", "storage", "api")
BASE_TRAIN = 4000
NUM_CLASSES = 10


def int_list(argument: str) -> list[int]:
    """A comma-separated list of positive integers."""
    values = [int(v) for v in argument.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {argument!r}")
    return values


# -- training points ------------------------------------------------------------------------------


def samples_for(train: int) -> int:
    """MNIST-1D samples whose 64% training split holds `train` examples (multiples of 10)."""
    return 10 * math.ceil(train / 6.4)


def dataset_file(train: int, directory: Path) -> Path:
    """MNIST-1D with `train` training examples, generated once and saved as npz (not timed)."""
    from caviar.models.data import load_dataset

    path = directory / f"mnist1d-{train}.npz"
    if not path.exists():
        ds = load_dataset({"name": "mnist1d", "samples": samples_for(train)})
        np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_dev=ds.x_dev, y_dev=ds.y_dev)
    return path


def run_point(data_path: Path, trials: int, width: int, epochs: int) -> dict:
    """Inside a fresh process: train `trials` trials for `epochs` epochs, timing every epoch."""
    from caviar.models.train import EpochReport, Shape, TrainData, train_batch

    arrays = np.load(data_path)
    shape = Shape(
        arrays["x_train"].shape[1],
        NUM_CLASSES,
        (width,) * len(HIDDEN),
        optimizer="momentum",
        batch_size=BATCH,
    )
    marks: list[tuple[float, int]] = []  # (time, trials trained) after each epoch

    def mark(report: EpochReport) -> None:
        marks.append((time.perf_counter(), int(report.trained.sum())))

    start = time.perf_counter()
    data = TrainData.from_arrays(
        arrays["x_train"], arrays["y_train"], arrays["x_dev"], arrays["y_dev"]
    )
    result = train_batch(shape, sample_hparams(trials, seed=0), data, epochs=epochs, callback=mark)
    wall = time.perf_counter() - start
    train, dev = len(arrays["y_train"]), len(arrays["y_dev"])
    return {
        "trials": trials,
        "train": train,
        "width": width,
        "wall_s": wall,
        "first_epoch_s": marks[0][0] - start,
        "steady_s": marks[-1][0] - marks[0][0],
        "steady_trial_epochs": sum(count for _, count in marks[1:]),
        "gflop_per_trial_epoch": epoch_gflop(width, train, dev),
        "diverged": sum(t.status == "diverged" for t in result.trials),
    }


def training_row(point: dict, peak: float) -> dict:
    """A table row of a training point: per-trial cost with compilation, throughput after it."""
    wall, trials = point["wall_s"], point["trials"]
    steady_gflops = point["gflop_per_trial_epoch"] * point["steady_trial_epochs"]
    gflops = steady_gflops / point["steady_s"]
    return {
        "trials": trials,
        "train": point["train"],
        "width": point["width"],
        "wall_s": wall,
        "s_per_trial": wall / trials,
        "trials_per_min": 60 * trials / wall,
        "first_epoch_s": point["first_epoch_s"],
        "ms_per_trial_epoch": 1000 * point["steady_s"] / point["steady_trial_epochs"],
        "gflop_per_s": gflops,
        "share_of_peak": gflops / peak,
        "diverged": point["diverged"],
    }


def sweep(points: list[tuple[int, int, int]], epochs: int, peak: float, cache: Path) -> list[dict]:
    """A row per (training examples, trials, width) point, each trained in its own process."""
    rows = []
    for train, trials, width in points:
        args = ["--point", str(dataset_file(train, cache)), "--epochs", str(epochs)]
        args += ["--trials", str(trials), "--width", str(width)]
        rows.append(training_row(run_contender("bench.scale", args), peak))
    return rows


# -- storage --------------------------------------------------------------------------------------


def bench_spec(trials: int, epochs: int) -> SearchSpec:
    """The base workload as a Caviar search spec."""
    from caviar.search.spec import SearchSpec

    return SearchSpec.model_validate(
        {
            "name": "scale-bench",
            "dataset": DATASET,
            "budget": {"trials": trials, "epochs": epochs},
            "space": {
                "learning_rate": {"low": 1e-4, "high": 1.0, "scale": "log"},
                "momentum": {"low": 0.9, "high": 0.999, "scale": "one_minus_log"},
                "l2": {"low": 1e-6, "high": 1e-2, "scale": "log"},
            },
            "fixed": {
                "optimizer": "momentum",
                "batch_size": BATCH,
                "hidden_units": HIDDEN[0],
                "hidden_layers": len(HIDDEN),
            },
        }
    )


def record_trials(url: str, spec: SearchSpec, search_id: str, count: int) -> dict[str, float]:
    """Open stage 1 of `search_id` on Caviar's Optuna storage at `url` and write `count` finished
    trials into it as a worker does (batches of 32: created, sampled and told in one transaction
    each, one per epoch's reports), without training; milliseconds per trial by phase."""
    from caviar.db.storage import (
        Finished,
        create_trials,
        deferred_writes,
        finish_trials,
        optuna_storage,
        record_heartbeats,
        report_epoch,
    )
    from caviar.search.runner import open_stage
    from caviar.search.space import sample_trial
    from caviar.search.trials import DEFAULT_BATCH

    storage = optuna_storage(url)
    objective = spec.resolved_objective("classification")
    study, space = open_stage(storage, spec, search_id, 1, objective)
    rng = np.random.default_rng(0)
    epochs = spec.budget.epochs
    spent = dict.fromkeys(("ask", "heartbeat", "report", "tell"), 0.0)

    @contextmanager
    def timed(phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        spent[phase] += time.perf_counter() - start

    for first in range(0, count, DEFAULT_BATCH):  # as a worker: a batch asked, then trained
        size = min(DEFAULT_BATCH, count - first)
        dev = rng.uniform(0.1, 0.9, (size, epochs))
        with timed("ask"):
            trials = create_trials(study, size)
        with timed("heartbeat"):  # the one a worker writes when it claims a trial
            record_heartbeats(storage, [trial._trial_id for trial in trials])
        with timed("ask"), deferred_writes(study, trials):
            for trial in trials:
                trial.set_user_attr("stage", 1)
                sample_trial(trial, space, spec.fixed)
        with timed("report"):
            for epoch in range(1, epochs + 1):
                report_epoch(
                    study, [(t, float(dev[i, epoch - 1]), epoch) for i, t in enumerate(trials)]
                )
                for trial in trials:
                    trial.should_prune()
        with timed("tell"):
            finished = []
            for i, trial in enumerate(trials):
                best = int(np.argmax(dev[i]))
                attrs = {
                    "epochs": epochs,
                    "train_loss": float(rng.uniform(0.1, 2)),
                    "train_accuracy": float(rng.uniform(0.1, 1)),
                    "dev_loss": float(rng.uniform(0.1, 2)),
                    "dev_accuracy": float(dev[i, best]),
                    "best_epoch": best + 1,
                }
                finished.append(Finished(trial, TrialState.COMPLETE, float(dev[i, best]), attrs))
            finish_trials(study, finished)
    return {f"{phase}_ms": 1000 * seconds / count for phase, seconds in spent.items()}


def storage_rows(
    postgres_url: str, trials: int, epochs: int, training_s: float | None
) -> list[dict]:
    """Milliseconds of storage work per trial on SQLite and PostgreSQL, and as % of training."""
    spec = bench_spec(trials, epochs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend, url in (("sqlite", f"sqlite:///{tmp}/scale.db"), ("postgresql", postgres_url)):
            phases = record_trials(url, spec, f"scale-storage-{backend}", trials)
            total = sum(phases.values())
            rows.append(
                {
                    "backend": backend,
                    "trials": trials,
                    "epochs": epochs,
                    **phases,
                    "ms_per_trial": total,
                    "training_s_per_trial": training_s,
                    "pct_of_training": None
                    if training_s is None
                    else total / 10 / training_s,  # ms/s
                }
            )
    return rows


# -- API ------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"caviar serve did not come up:\n{log.read_text()[-3000:]}")


def filled_search(url: str, api: httpx.Client, trials: int, epochs: int) -> str:
    """Submit a search through the API, open its first stage and finish `trials` trials in it."""
    from caviar.db.session import session_scope
    from caviar.db.tables import Search, utcnow
    from caviar.search.studies import study_name

    spec = bench_spec(trials, epochs)
    response = api.post("/v1/searches", json=spec.model_dump(mode="json", exclude_none=True))
    response.raise_for_status()
    search_id = response.json()["id"]
    record_trials(url, spec, search_id, trials)
    with session_scope(url) as session:  # what a worker's claim records when it opens stage 1
        row = session.get(Search, search_id)
        assert row is not None
        row.stage, row.studies = 1, [study_name(search_id, 1)]
        row.status, row.started_at = "running", utcnow()
    return search_id


def concurrent_gets(
    base_url: str, headers: dict, path: str, clients: int, requests: int
) -> tuple[list[float], float]:
    """Latencies (s) of `clients` threads each sending `requests` GETs at once, and the span."""
    barrier = threading.Barrier(clients)

    def client() -> list[tuple[float, float]]:
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
            http.get(path).raise_for_status()  # connect (not timed)
            barrier.wait()
            spans = []
            for _ in range(requests):
                start = time.perf_counter()
                http.get(path).raise_for_status()
                spans.append((start, time.perf_counter()))
            return spans

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        spans = [span for future in futures for span in future.result()]
    latencies = [end - start for start, end in spans]
    return latencies, max(e for _, e in spans) - min(s for s, _ in spans)


def api_latency(
    url: str, trials: int, epochs: int, clients: int, requests: int
) -> tuple[dict, list[float]]:
    """Latency figures (p50, p99, mean) and requests/s of `GET /v1/searches/{id}` on a real
    `caviar serve`, and every request's latency in ms."""
    from caviar.db.keys import create_key
    from caviar.db.session import session_scope

    with session_scope(url) as session:
        _, token = create_key(session, "bench", "scale")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        command = ["serve", "--port", str(port), "--database-url", url]
        server = subprocess.Popen(
            [sys.executable, "-m", "caviar.service.cli", *command], stdout=log, stderr=log
        )
        try:
            wait_until_up(f"{base_url}/healthz", server, Path(log.name))
            with httpx.Client(base_url=base_url, headers=headers, timeout=60) as api:
                search_id = filled_search(url, api, trials, epochs)
                body = api.get(f"/v1/searches/{search_id}")
                body.raise_for_status()
            latencies, span = concurrent_gets(
                base_url, headers, f"/v1/searches/{search_id}", clients, requests
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    ms = 1000 * np.asarray(latencies)
    return {
        "clients": clients,
        "requests": len(latencies),
        "search_trials": trials,
        "body_bytes": len(body.content),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "max_ms": float(ms.max()),
        "requests_per_s": len(latencies) / span,
    }, ms.tolist()


# -- plots ----------------------------------------------------------------------------------------


def plot(path: Path, title: str, draw: Callable[[Axes], None]) -> None:
    """One figure: `draw(axes)` fills it, then it is saved to `path` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    draw(axes)
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def draw_per_trial(axes: Axes, rows: list[dict], x_key: str, x_label: str, epochs: int) -> None:
    """Seconds per trial against `x_key`: the whole run, and all epochs at the steady rate."""
    x = [r[x_key] for r in rows]
    axes.plot(x, [r["s_per_trial"] for r in rows], "o-", label="whole run (compilation incl.)")
    steady = [r["ms_per_trial_epoch"] * epochs / 1000 for r in rows]
    axes.plot(x, steady, "s--", label=f"{epochs} epochs at the rate after epoch 1")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(x, [str(v) for v in x])
    axes.set_xlabel(x_label)
    axes.set_ylabel("seconds per trial")
    axes.legend(loc="best")


def draw_width(axes: Axes, rows: list[dict], epochs: int) -> None:
    """Seconds per trial and share of the matmul peak against the hidden width."""
    draw_per_trial(axes, rows, "width", "hidden units per layer (2 layers)", epochs)
    share = axes.twinx()
    share.plot([r["width"] for r in rows], [100 * r["share_of_peak"] for r in rows], "^:", c="g")
    share.set_ylabel("% of float32 matmul peak (after epoch 1)", color="g")
    share.set_ylim(bottom=0)


def draw_storage(axes: Axes, rows: list[dict]) -> None:
    """Bars: storage milliseconds per trial on each backend, and the training time per trial."""
    names = [r["backend"] for r in rows]
    values = [r["ms_per_trial"] for r in rows]
    if rows[0]["training_s_per_trial"] is not None:
        names.append("training")
        values.append(1000 * rows[0]["training_s_per_trial"])
    bars = axes.bar(names, values, color=["C0", "C1", "C2"][: len(values)])
    axes.bar_label(bars, labels=[f"{v:.3g} ms" if v < 1000 else f"{v:.0f} ms" for v in values])
    axes.set_yscale("log")
    axes.set_ylabel("milliseconds per trial")


def draw_api(axes: Axes, api: dict, latencies_ms: list[float]) -> None:
    """A histogram of request latencies with the p50 and p99 marked."""
    axes.hist(latencies_ms, bins=50)
    for name in ("p50_ms", "p99_ms"):
        axes.axvline(api[name], ls="--", c="k")
        label = f"{name[:3]} {api[name]:.3g} ms "
        axes.annotate(
            label, (api[name], 1), xycoords=("data", "axes fraction"), rotation=90, va="top"
        )
    axes.set_xlabel("latency of GET /v1/searches/{id}, ms")
    axes.set_ylabel("requests")


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=lambda v: v.split(","), default=list(SECTIONS))
    parser.add_argument("--epochs", type=int, default=5, help="per trial (at least 2)")
    parser.add_argument("--trials", type=int, default=32, help="trials of the data/width points")
    parser.add_argument("--trial-counts", type=int_list, default=[32, 128, 512])
    parser.add_argument("--train-sizes", type=int_list, default=[4000, 40000, 200000])
    parser.add_argument("--widths", type=int_list, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--storage-trials", type=int, default=64)
    parser.add_argument("--api-trials", type=int, default=128, help="trials of the GET search")
    parser.add_argument("--api-clients", type=int, default=32)
    parser.add_argument("--api-requests", type=int, default=50, help="per client")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--point", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=HIDDEN[0], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch includes compilation)")
    if unknown := set(args.only) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")

    if args.point:  # inside a training point's own process
        from caviar.models.runtime import use_every_core

        use_every_core()  # as `caviar run` and workers do
        print(json.dumps(run_point(args.point, args.trials, args.width, args.epochs)))
        return

    import optuna

    from caviar.models.runtime import matmul_peak_gflops

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    peak = matmul_peak_gflops()
    info = machine()
    print(f"machine: {info}")
    mlp, base = f"MLP 40→{'→'.join(map(str, HIDDEN))}→10", f"MNIST-1D {BASE_TRAIN} train"
    print(
        f"workload: MNIST-1D, {mlp} relu, momentum SGD, batch {BATCH}, {args.epochs} epochs, "
        f"hyperparameters as bench.engine; float32 matmul peak {peak:.0f} GFLOP/s"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"trials": [], "data": [], "width": [], "storage": [], "api": None}
    latencies_ms: list[float] = []
    titles = {
        "trials": f"trials of one shape ({mlp}, {base}, {args.epochs} epochs)",
        "data": f"MNIST-1D training examples ({args.trials} trials, {mlp}, {args.epochs} epochs)",
        "width": f"width of 2 hidden layers ({args.trials} trials, {base}, {args.epochs} epochs)",
    }
    sweeps = {
        "trials": [(BASE_TRAIN, n, HIDDEN[0]) for n in args.trial_counts],
        "data": [(n, args.trials, HIDDEN[0]) for n in args.train_sizes],
        "width": [(BASE_TRAIN, args.trials, n) for n in args.widths],
    }
    training_columns = [
        "trials", "train", "width", "wall_s", "s_per_trial", "trials_per_min", "first_epoch_s",
        "ms_per_trial_epoch", "gflop_per_s", "share_of_peak", "diverged",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        for section, points in sweeps.items():
            if section in args.only:
                print(f"\n{titles[section]}; each (train, trials, width) in a fresh process:")
                print(points)
                results[section] = sweep(points, args.epochs, peak, Path(cache))
                print_table(results[section], training_columns)

    if {"storage", "api"} & set(args.only):
        from bench.pool import BENCH_URL, fresh_database

        fresh_database()
    if "storage" in args.only:
        reference = min(
            results["trials"], key=lambda r: abs(r["trials"] - args.trials), default=None
        )
        titles["storage"] = (
            f"Optuna storage per trial ({args.epochs} reports), no training; training "
            + (f"at {reference['trials']} trials" if reference else "not measured")
        )
        print(f"\n{titles['storage']}: {args.storage_trials} trials per backend")
        results["storage"] = storage_rows(
            BENCH_URL,
            args.storage_trials,
            args.epochs,
            reference["s_per_trial"] if reference else None,
        )
        print_table(results["storage"], list(results["storage"][0]))
    if "api" in args.only:
        titles["api"] = (
            f"GET /v1/searches/{{id}} ({args.api_trials} trials × {args.epochs} epochs), "
            f"{args.api_clients} clients × {args.api_requests} requests, PostgreSQL"
        )
        print(f"\n{titles['api']}, caviar serve on loopback")
        results["api"], latencies_ms = api_latency(
            BENCH_URL, args.api_trials, args.epochs, args.api_clients, args.api_requests
        )
        print_table([results["api"]], list(results["api"]))

    charts = {
        "trials": partial(
            draw_per_trial,
            rows=results["trials"],
            x_key="trials",
            x_label="trials of one shape",
            epochs=args.epochs,
        ),
        "data": partial(
            draw_per_trial,
            rows=results["data"],
            x_key="train",
            x_label="training examples",
            epochs=args.epochs,
        ),
        "width": partial(draw_width, rows=results["width"], epochs=args.epochs),
        "storage": partial(draw_storage, rows=results["storage"]),
        "api": partial(draw_api, api=results["api"], latencies_ms=latencies_ms),
    }
    for section in SECTIONS:
        if section in args.only:
            plot(args.out / f"scale-{section}.png", titles[section], charts[section])
    summary = {"benchmark": "scale", "machine": info, "peak_gflops": peak, **results}
    (args.out / "scale.json").write_text(json.dumps(summary, indent=1))
    print(f"\nplots and scale.json written to {args.out}{os.sep}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
