"""Train K trials together in one bucket's compiled program: the host loop.

Trials of different shapes share a program when they fit one `Bucket` (see `models.bucket`;
`models.planner` chooses the buckets); the maths are the pure functions of `models.program`,
vmapped over the trial axis and compiled once per bucket, group size and data size.

Per epoch, the training set is shuffled once for the whole batch (common random numbers) and laid
out as [steps, batch, features]; trials train in groups of `group_size`, each group one call of
the bucket's epoch program. Stopped and diverged trials leave the groups, so they stop costing
compute. The engine measures what its programs cost (`RATES`: compile seconds, padded FLOP/s),
for the planner.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.bucket import Bucket, Shape, Task, epoch_flops
from models.placement import Placement
from models.planner import Costs
from models.program import (
    HPARAM_DEFAULTS,
    TrialState,
    init_trial,
    output_metrics,
    real_variables,
    train_epoch,
    trial_arrays,
)
from models.runtime import matmul_peak_gflops

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "HPARAM_DEFAULTS",
    "RATES",
    "BatchResult",
    "Bucket",
    "EpochCallback",
    "EpochReport",
    "Rates",
    "Shape",
    "Task",
    "TrainData",
    "TrialResult",
    "compile_count",
    "compiled_buckets",
    "default_monitor",
    "evaluate",
    "initial_variables",
    "planning_costs",
    "predict",
    "train_batch",
]

#: How many trials one compiled call trains at once. On a 2-core CPU, groups of 2-8 trials beat
#: one group of 32 (the working set stays in cache); `bench/engine.py --group-sizes` measures it.
DEFAULT_GROUP_SIZE = 4


@dataclass(frozen=True)
class TrainData:
    """Training and dev arrays, placed on the device once and reused by every epoch and batch."""

    x_train: jax.Array
    y_train: jax.Array
    x_dev: jax.Array
    y_dev: jax.Array
    target_std: float = 1.0  # regression: MSE is reported on the original target scale

    @classmethod
    def from_arrays(cls, x_train, y_train, x_dev, y_dev, target_std: float = 1.0) -> TrainData:
        return cls(
            jax.device_put(np.asarray(x_train, np.float32)),
            jax.device_put(np.asarray(y_train)),
            jax.device_put(np.asarray(x_dev, np.float32)),
            jax.device_put(np.asarray(y_dev)),
            float(target_std),
        )


@dataclass(frozen=True)
class EpochReport:
    """What the callback sees after each epoch: metrics of the trials trained in it.

    `metrics[name]` has one value per trial of the batch, NaN for trials that did not train.
    """

    epoch: int  # 1-based
    metrics: dict[str, np.ndarray]
    trained: np.ndarray  # bool [K]
    diverged: np.ndarray  # bool [K]: trained this epoch and their loss went NaN or infinite


#: Receives each epoch's report; returns a bool mask of trials to stop (or None to go on).
EpochCallback = Callable[[EpochReport], "np.ndarray | None"]

TrialStatus = Literal["completed", "stopped", "diverged"]


@dataclass
class TrialResult:
    """One trial's outcome; `best` holds the metrics of its best dev epoch (early stopping)."""

    status: TrialStatus
    epochs: int
    best_epoch: int | None
    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class BatchResult:
    """Outcome of `train_batch`: per-trial results and every trial's kept (padded) variables."""

    bucket: Bucket
    shapes: list[Shape]
    trials: list[TrialResult]
    params: dict  # padded, numpy, with a leading trial axis
    stats: dict

    def trial_variables(self, index: int) -> dict:
        """One trial's kept variables as its own real-shape Flax MLP's (no trial axis)."""
        row = functools.partial(jax.tree_util.tree_map, lambda a: a[index])
        return real_variables(self.shapes[index], row(self.params), row(self.stats))


@dataclass
class Rates:
    """What this process measured its programs to cost, for the planner (None: not yet)."""

    compile_s: float | None = None  # building one new bucket program: trace, lower, compile
    flops_per_s: float | None = None  # padded training FLOPs per second, over recent epochs

    def record_compile(self, seconds: float) -> None:
        self.compile_s = seconds if self.compile_s is None else 0.5 * (self.compile_s + seconds)

    def record_epoch(self, flops: float, seconds: float) -> None:
        rate = flops / max(seconds, 1e-9)
        self.flops_per_s = rate if self.flops_per_s is None else 0.8 * self.flops_per_s + 0.2 * rate


#: This process's measurements.
RATES = Rates()


#: What the planner assumes a new program costs before this process has measured one.
COMPILE_PRIOR_S = 1.0


def planning_costs(data: TrainData, *, epochs: int, group_size: int, trials: int) -> Costs:
    """The planner's costs for a batch of `trials` on `data`: this process's measured rates;
    before any, `COMPILE_PRIOR_S` and a short matmul probe of the FLOP rate."""
    return Costs(
        compile_s=COMPILE_PRIOR_S if RATES.compile_s is None else RATES.compile_s,
        flops_per_s=RATES.flops_per_s or _probe_flops_per_s(),
        epochs=epochs,
        train_examples=data.x_train.shape[0],
        dev_examples=data.x_dev.shape[0],
        group_size=Placement.local(trials).round_up(max(1, min(group_size, trials))),
    )


@functools.cache
def _probe_flops_per_s() -> float:
    return matmul_peak_gflops(size=256, repeats=20) * 1e9


class _ProgramKey(NamedTuple):
    """One compiled epoch program: its bucket, and what else sets its array shapes."""

    bucket: Bucket
    monitor: tuple[str, bool]
    decay_every: int
    group_size: int
    train_rows: int
    dev_rows: int
    devices: int


_EXECUTABLES: dict[_ProgramKey, Any] = {}


def compile_count() -> int:
    """How many epoch programs this process has compiled (for tests and benchmarks)."""
    return len(_EXECUTABLES)


def compiled_buckets(
    data: TrainData, monitor: tuple[str, bool], decay_every: int = 10
) -> frozenset[Bucket]:
    """The buckets with a program compiled in this process for this data and monitor."""
    rows = (data.x_train.shape[0], data.x_dev.shape[0])
    return frozenset(
        k.bucket
        for k in _EXECUTABLES
        if (k.monitor, k.decay_every, k.train_rows, k.dev_rows) == (monitor, decay_every, *rows)
    )


def default_monitor(task: Task) -> tuple[str, bool]:
    """The dev metric that picks a trial's best epoch, and whether higher is better."""
    return ("dev_accuracy", True) if task == "classification" else ("dev_mse", False)


def train_batch(
    shape: Shape | Sequence[Shape],
    hparams: Sequence[Mapping[str, Any]],
    data: TrainData,
    *,
    epochs: int,
    callback: EpochCallback | None = None,
    data_seed: int = 0,
    group_size: int = DEFAULT_GROUP_SIZE,
    monitor: tuple[str, bool] | None = None,
    decay_every: int = 10,
    keep_best: bool = True,
    bucket: Bucket | None = None,
) -> BatchResult:
    """Train K trials for up to `epochs` epochs in one bucket's program.

    `shape` is every trial's shape, or one per trial; `hparams` holds each trial's continuous
    hyperparameters (`HPARAM_DEFAULTS`). `bucket` defaults to the smallest one they fit. After
    each epoch `callback` receives an `EpochReport` and may return a mask of trials to stop.
    Trials whose loss becomes non-finite stop as `diverged`; the others go on. `monitor`
    (metric, maximize) chooses each trial's best dev epoch, whose metrics and variables are
    returned; with `keep_best=False` the variables are those of the last epoch trained.
    """
    shapes = [shape] * len(hparams) if isinstance(shape, Shape) else list(shape)
    if len(shapes) != len(hparams):
        raise ValueError(f"{len(shapes)} shapes for {len(hparams)} trials")
    bucket = bucket or Bucket.envelope(shapes)
    hp = trial_arrays(bucket, shapes, hparams)
    num_trials = len(shapes)
    train_rows = data.x_train.shape[0]
    steps = train_rows // bucket.batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size {bucket.batch_size} exceeds the {train_rows} training examples"
        )
    monitor = monitor or default_monitor(bucket.task)
    programs = _programs(bucket, monitor, decay_every)
    placement = Placement.local(num_trials)
    key_of = functools.partial(
        _ProgramKey,
        bucket,
        monitor,
        decay_every,
        train_rows=train_rows,
        dev_rows=data.x_dev.shape[0],
        devices=placement.devices,
    )
    group_size = _group_size(placement, min(group_size, num_trials), key_of)
    program_key = key_of(group_size)
    new_program = program_key not in _EXECUTABLES
    build_start = time.perf_counter()
    arrays = placement.replicate((data.x_train, data.y_train, data.x_dev, data.y_dev))
    data = TrainData(*arrays, target_std=data.target_std)

    active = np.ones(num_trials, bool)
    status: list[TrialStatus] = ["completed"] * num_trials
    epochs_done = np.zeros(num_trials, int)
    history: list[list[dict[str, float]]] = [[] for _ in range(num_trials)]
    flops_per_slot = epoch_flops(bucket, train_rows, data.x_dev.shape[0])

    # Trial states live in groups on the devices (the trial axis sharded across them); a trial's
    # state is parked on the host when its group is re-formed (a trial stopped) and is where the
    # final variables are read from.
    parked: dict[int, TrialState] = {}
    groups = []
    fresh = [init_trial(bucket, s, h) for s, h in zip(shapes, hparams, strict=True)]
    for members, slots in _partition(np.arange(num_trials), group_size):
        state = placement.shard(_stack([fresh[i] for i in slots]))
        groups.append(_Group(members, state, placement.shard(_rows(hp, slots))))
    for epoch in range(epochs):
        running = np.flatnonzero(active)
        if running.size == 0:
            break
        if not np.array_equal(np.concatenate([g.members for g in groups]), running):
            _park(groups, parked)
            groups = [
                _Group(
                    members,
                    placement.shard(_stack([parked[i] for i in slots])),
                    placement.shard(_rows(hp, slots)),
                )
                for members, slots in _partition(running, group_size)
            ]
        xs, ys = programs.shuffle(
            data.x_train,
            data.y_train,
            _epoch_order(data_seed, epoch, steps * bucket.batch_size, train_rows),
        )
        args = (data.x_dev, data.y_dev, jnp.int32(epoch), jnp.float32(data.target_std))
        if program_key not in _EXECUTABLES:
            first = groups[0]
            _EXECUTABLES[program_key] = programs.epoch.lower(
                first.state, first.hparams, xs, ys, *args
            ).compile()
        if new_program:
            RATES.record_compile(time.perf_counter() - build_start)
            new_program = False
        executable = _EXECUTABLES[program_key]
        epoch_start = time.perf_counter()
        pending = []
        for group in groups:
            group.state, metrics = executable(group.state, group.hparams, xs, ys, *args)
            pending.append((group.members, metrics))
        report = _report(epoch + 1, num_trials, pending)
        RATES.record_epoch(
            len(groups) * group_size * flops_per_slot, time.perf_counter() - epoch_start
        )
        for i in running:
            epochs_done[i] += 1
            history[i].append({name: float(values[i]) for name, values in report.metrics.items()})
        for i in np.flatnonzero(report.diverged):
            active[i], status[i] = False, "diverged"
        stop = callback(report) if callback is not None else None
        if stop is not None and epoch + 1 < epochs:  # after the last epoch nothing is left to stop
            for i in np.flatnonzero(np.asarray(stop, bool) & active):
                active[i], status[i] = False, "stopped"
    _park(groups, parked)
    state = _stack([parked[i] for i in range(num_trials)])

    best_epoch = np.asarray(state.best_epoch)
    trials = []
    for i in range(num_trials):
        best = history[i][best_epoch[i] - 1] if best_epoch[i] > 0 else {}
        trials.append(
            TrialResult(
                status=status[i],
                epochs=int(epochs_done[i]),
                best_epoch=int(best_epoch[i]) if best_epoch[i] > 0 else None,
                best=best,
                history=history[i],
            )
        )
    if keep_best:
        return BatchResult(bucket, shapes, trials, state.best_params, state.best_stats)
    return BatchResult(bucket, shapes, trials, state.params, state.stats)


def _group_size(placement: Placement, wanted: int, key_of: Callable[[int], _ProgramKey]) -> int:
    """The group size of a batch: `wanted` rounded up to the devices, or the smallest larger one
    this bucket already has a program for (a few repeated slots cost less than a compile)."""
    size = placement.round_up(max(1, wanted))
    compiled = [k.group_size for k in _EXECUTABLES if k == key_of(k.group_size)]
    return min((g for g in compiled if g >= size), default=size)


@dataclass
class _Group:
    """Trials trained by one compiled call; a short group is padded with repeats of its members."""

    members: np.ndarray
    state: TrialState
    hparams: dict[str, jax.Array]


def _epoch_order(data_seed: int, epoch: int, size: int, examples: int) -> np.ndarray:
    """The epoch's shuffled example order, shared by every trial (common random numbers)."""
    return np.random.default_rng([data_seed, epoch]).permutation(examples)[:size].astype(np.int32)


def _partition(indices: np.ndarray, group_size: int):
    """(members, slots) per group; a short group's slots repeat its members to fill the group."""
    for start in range(0, indices.size, group_size):
        members = indices[start : start + group_size]
        yield members, np.resize(members, group_size)


def _rows(tree, rows: np.ndarray):
    """Select trial rows of a host pytree."""
    return jax.tree_util.tree_map(lambda a: a[rows], tree)


def _stack(states: list):
    """Stack per-trial host pytrees on a new leading trial axis."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *states)


def _park(groups: list[_Group], parked: dict[int, TrialState]) -> None:
    """Copy every group member's state to the host (one transfer per group)."""
    for group, state in zip(groups, jax.device_get([g.state for g in groups]), strict=True):
        for row, index in enumerate(group.members):
            parked[int(index)] = jax.tree_util.tree_map(lambda a, r=row: a[r], state)


def _report(epoch: int, num_trials: int, pending) -> EpochReport:
    fetched = jax.device_get([metrics for _, metrics in pending])
    names = fetched[0].keys()
    metrics = {name: np.full(num_trials, np.nan) for name in names}
    trained = np.zeros(num_trials, bool)
    for (members, _), values in zip(pending, fetched, strict=True):
        trained[members] = True
        for name in names:
            metrics[name][members] = values[name][: members.size]
    finite = np.isfinite(metrics["train_loss"]) & np.isfinite(metrics["dev_loss"])
    return EpochReport(epoch=epoch, metrics=metrics, trained=trained, diverged=trained & ~finite)


class _Programs(NamedTuple):
    shuffle: Callable
    epoch: Callable


@functools.lru_cache(maxsize=256)
def _programs(bucket: Bucket, monitor: tuple[str, bool], decay_every: int) -> _Programs:
    """The jitted functions of one bucket: built once, so their compile caches persist."""
    batch = bucket.batch_size

    def shuffle(x, y, order):
        steps = order.shape[0] // batch
        return (
            x[order].reshape(steps, batch, x.shape[1]),
            y[order].reshape(steps, batch, *y.shape[1:]),
        )

    epoch = functools.partial(train_epoch, bucket, monitor, decay_every)
    return _Programs(
        shuffle=jax.jit(shuffle),
        epoch=jax.jit(
            jax.vmap(epoch, in_axes=(0, 0, None, None, None, None, None, None)),
            donate_argnums=0,
            compiler_options=_cpu_options(),
        ),
    )


def _cpu_options() -> dict[str, str] | None:
    """XLA options for the epoch programs: on the CPU, LLVM's optimisation level 1.

    Measured on MNIST-1D 40→256→256→10 (bench/engine.py): it halves the compile (3.3 s → 1.5 s)
    and leaves the steady epoch time unchanged; level 0 doubles the epoch time.
    """
    return {"xla_backend_optimization_level": "1"} if jax.default_backend() == "cpu" else None


def initial_variables(shape: Shape, hparams: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The real-shape variables `train_batch` starts each of these trials from."""
    bucket = Bucket.exact(shape)
    states = [init_trial(bucket, shape, h) for h in hparams]
    return [real_variables(shape, state.params, state.stats) for state in states]


def evaluate(
    shape: Shape, variables: dict, x: np.ndarray, y: np.ndarray, target_std: float = 1.0
) -> dict[str, float]:
    """Metrics of one trained model (eval mode: no dropout, batch-norm running averages).

    Keys are `loss` and `accuracy` (classification) or `loss`, `mse`, `r2` (regression).
    """
    metrics = _evaluation(shape)(variables, jnp.asarray(x, jnp.float32), jnp.asarray(y), target_std)
    return {name: float(value) for name, value in metrics.items()}


@functools.lru_cache(maxsize=64)
def _evaluation(shape: Shape) -> Callable:
    """`evaluate`'s jitted maths for one shape (eagerly, each operation would compile alone)."""

    def metrics(variables, x, y, target_std):
        out = shape.model.apply(variables, x, train=False)
        return output_metrics(shape.task, out, y, target_std)

    return jax.jit(metrics)


def predict(shape: Shape, variables: dict, x: np.ndarray) -> np.ndarray:
    """Class ids (classification) or predictions in the model's target units (regression)."""
    out = np.asarray(shape.model.apply(variables, jnp.asarray(x, jnp.float32), train=False))
    return out.argmax(-1) if shape.task == "classification" else out[:, 0]
