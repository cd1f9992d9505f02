"""Train trials together in one bucket's compiled program: the host loop.

Trials of different shapes share a program when they fit one `Bucket` (see `models.bucket`;
`models.planner` chooses the buckets); the maths are the pure functions of `models.program`,
vmapped over the trial axis and compiled once per bucket, group size and data size.

The program trains a fixed number of slots (`models.slots`), in groups of `group_size`, each
group one call of the bucket's epoch program per round. A slot carries its trial's own epoch:
the epoch's shuffled example order is the trial's (the same for every trial at that epoch:
common random numbers), gathered minibatch by minibatch inside the program. When a trial
ends (stopped, diverged, out of epochs) the next trial takes its slot in place, so trials of a
stream never wait for a whole group to end. The engine measures what its programs cost
(`RATES`: compile seconds, padded FLOP/s), for the planner.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np

from caviar.models import executables
from caviar.models.bucket import Bucket, Shape, epoch_flops
from caviar.models.data import Task
from caviar.models.executables import ProgramKey, compile_count
from caviar.models.placement import Placement
from caviar.models.planner import Costs
from caviar.models.program import (
    HPARAM_DEFAULTS,
    TrialState,
    init_trial,
    output_metrics,
    real_variables,
    train_epoch,
    trial_arrays,
)
from caviar.models.runtime import matmul_peak_gflops, switch_setting
from caviar.models.slots import (
    EMPTY,
    Group,
    build_groups,
    read_groups,
    read_slot,
    warm_slot_programs,
    write_slot,
)

__all__ = [
    "DISPATCH_AHEAD",
    "GROUP_SIZES",
    "HPARAM_DEFAULTS",
    "RATES",
    "BatchResult",
    "Bucket",
    "EndedTrial",
    "EpochCallback",
    "EpochReport",
    "Lane",
    "MoreLanes",
    "Rates",
    "Refill",
    "Shape",
    "Task",
    "Traffic",
    "TrainData",
    "TrialResult",
    "cached_buckets",
    "compile_ahead",
    "compile_count",
    "compiled_buckets",
    "default_dispatch_ahead",
    "default_group_size",
    "default_monitor",
    "evaluate",
    "evaluate_splits",
    "initial_variables",
    "planning_costs",
    "predict",
    "train_batch",
    "train_buckets",
]

#: How many trials one compiled call trains at once, by JAX backend. On a 2-core CPU, groups of
#: 2-8 trials beat one group of 32 (the working set stays in cache; `bench/engine.py
#: --group-sizes` measures it). On an accelerator one small-MLP step is a few microseconds of
#: work against tens of kernel launches, so a call trains a whole claim of trials; that figure
#: is a choice, not a measurement (`bench/gpu_check.py` measures it where a GPU is lent).
GROUP_SIZES: dict[str, int] = {"cpu": 4, "gpu": 256, "tpu": 256}
#: Environment variable that overrides `GROUP_SIZES` (`caviar run`, workers, `train_batch`).
GROUP_SIZE_ENV = "CAVIAR_GROUP_SIZE"
#: Whether the next round is dispatched before the host handles the last one's reports, by JAX
#: backend. On an accelerator a round is about a millisecond of device work against the
#: callback's database round trip, so the device would mostly wait. On a CPU the device is the
#: host's own cores, and a stopped trial's extra round is compute the search pays for
#: (`bench/gpu_check.py` measures both).
DISPATCH_AHEAD: dict[str, bool] = {"cpu": False, "gpu": True, "tpu": True}
#: Environment variable that overrides `DISPATCH_AHEAD`: 1 (ahead) or 0 (in lockstep).
DISPATCH_AHEAD_ENV = "CAVIAR_DISPATCH_AHEAD"


def group_size_override() -> int | None:
    """`$CAVIAR_GROUP_SIZE` (None when unset); ValueError when it is not a whole number >= 1."""
    value = os.environ.get(GROUP_SIZE_ENV)
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{GROUP_SIZE_ENV}={value!r}: expected a whole number, at least 1")
    return int(value)


def default_group_size() -> int:
    """Trials per compiled call: `$CAVIAR_GROUP_SIZE`, else `GROUP_SIZES` for JAX's backend."""
    return group_size_override() or GROUP_SIZES.get(jax.default_backend(), GROUP_SIZES["gpu"])


def dispatch_ahead_override() -> bool | None:
    """`$CAVIAR_DISPATCH_AHEAD` (None when unset); ValueError when it is not 0 or 1."""
    return switch_setting(DISPATCH_AHEAD_ENV)


def default_dispatch_ahead() -> bool:
    """`$CAVIAR_DISPATCH_AHEAD`, else `DISPATCH_AHEAD` for JAX's backend."""
    override = dispatch_ahead_override()
    return DISPATCH_AHEAD.get(jax.default_backend(), True) if override is None else override


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
    """What the callback sees after each round of the program: metrics of the trials it trained.

    Trials are numbered in the order they came: the given ones, then each refill's. Every array
    has one entry per trial so far: `metrics[name]` NaN and `epochs` 0 for trials that did not
    train in this round.
    """

    round: int  # 1-based: calls of the bucket's program so far
    epochs: np.ndarray  # int [N]: the epoch each trial just trained, its own (1-based)
    metrics: dict[str, np.ndarray]
    trained: np.ndarray  # bool [N]
    diverged: np.ndarray  # bool [N]: trained this round and their loss went NaN or infinite


#: Receives each round's report; returns a bool mask of trials to stop (or None to go on).
EpochCallback = Callable[[EpochReport], "np.ndarray | None"]

#: Asked for at most n more trials when n slots are free: (shape, hyperparameters) pairs that
#: fit the bucket; none ends the refills.
Refill = Callable[[int], Sequence[tuple[Shape, Mapping[str, Any]]]]

TrialStatus = Literal["completed", "stopped", "diverged"]


@dataclass
class TrialResult:
    """One trial's outcome; `best` holds the metrics of its best dev epoch (early stopping)."""

    status: TrialStatus
    epochs: int
    best_epoch: int | None
    best: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class EndedTrial(NamedTuple):
    """A trial that left its slot: its number in its lane, its result, and its kept variables
    (a function: cutting them to the trial's real shape is left until they are wanted)."""

    trial: int
    result: TrialResult
    variables: Callable[[], dict]


#: Told, once per round, every trial that left its slot in that round (never an empty list), so
#: that their outcomes can be recorded together.
TrialEnd = Callable[[list[EndedTrial]], None]


@dataclass
class Traffic:
    """What a `train_batch` call asked of the device: rounds, programs launched, host reads."""

    rounds: int = 0  # rounds reported
    epoch_calls: int = 0  # launches of the bucket's epoch program (one per group per round)
    slot_writes: int = 0  # new trials written into slots (one small program each)
    host_reads: int = 0  # transfers the host waited for: a round's metrics, a leaving trial's
    # state, the states of groups packed together


@dataclass
class BatchResult:
    """Outcome of `train_batch`: per-trial results and each trial's kept (padded) variables."""

    bucket: Bucket
    shapes: list[Shape]
    trials: list[TrialResult]
    kept: list[tuple[dict, dict]]  # per trial: padded (params, stats) on the host; empty for
    # trials told to `on_end`, which received them
    occupancy: float = 1.0  # the share of slot-epochs run that trained a live trial
    traffic: Traffic = field(default_factory=Traffic)

    def trial_variables(self, index: int) -> dict:
        """One trial's kept variables as its own real-shape Flax MLP's (no trial axis)."""
        return real_variables(self.shapes[index], *self.kept[index])


@dataclass
class Rates:
    """What this process measured its programs to cost, for the planner (None: not yet)."""

    compile_s: float | None = None  # building one new bucket program: trace, lower, compile
    load_s: float | None = None  # the same for a program read from the persistent cache
    flops_per_s: float | None = None  # padded training FLOPs per second, over recent epochs

    def record_compile(self, seconds: float, loaded: bool = False) -> None:
        """One program built in `seconds`: compiled, or `loaded` from the persistent cache."""
        if loaded:
            self.load_s = seconds if self.load_s is None else 0.5 * (self.load_s + seconds)
        else:
            self.compile_s = seconds if self.compile_s is None else 0.5 * (self.compile_s + seconds)
        self.save()

    def save(self) -> None:
        """Leave what is measured beside the persistent cache's index, for the next process."""
        measured = {k: v for k, v in asdict(self).items() if v is not None}
        if measured:
            executables.write_index_note(RATES_NOTE, measured)

    def restore(self) -> None:
        """Take what this process has not measured yet from the last process's note, if any."""
        for name, value in executables.read_index_note(RATES_NOTE).items():
            if name in RATE_FIELDS and getattr(self, name) is None and _positive(value):
                setattr(self, name, float(value))

    def record_epoch(self, flops: float, seconds: float) -> None:
        rate = flops / max(seconds, 1e-9)
        self.flops_per_s = rate if self.flops_per_s is None else 0.8 * self.flops_per_s + 0.2 * rate


#: This process's measurements.
RATES = Rates()
#: The note beside the persistent cache's index that carries `Rates` to the next process.
RATES_NOTE = "rates.json"
RATE_FIELDS = frozenset(f.name for f in fields(Rates))


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


#: What the planner assumes a new program costs before this process has measured one, and a
#: program in the persistent cache (tracing and lowering it stay; XLA's compile does not).
COMPILE_PRIOR_S = 1.0
LOAD_PRIOR_S = 0.3


def planning_costs(data: TrainData, *, epochs: float, group_size: int, trials: int) -> Costs:
    """The planner's costs for a batch of `trials` on `data`: this process's measured rates, or
    those a process before it left beside the persistent cache; before any, `COMPILE_PRIOR_S`,
    `LOAD_PRIOR_S` and a short matmul probe of the FLOP rate."""
    RATES.restore()
    RATES.save()
    placement = Placement.local(trials)
    return Costs(
        compile_s=COMPILE_PRIOR_S if RATES.compile_s is None else RATES.compile_s,
        load_s=LOAD_PRIOR_S if RATES.load_s is None else RATES.load_s,
        flops_per_s=RATES.flops_per_s or _probe_flops_per_s(),
        epochs=epochs,
        train_examples=data.x_train.shape[0],
        dev_examples=data.x_dev.shape[0],
        group_size=placement.round_up(max(1, min(group_size, trials))),
        devices=placement.devices,
    )


#: Reads of the FLOP-rate probe; the planner takes the best. One short read (20 matmuls of
#: 256², 10 ms) measured 26–79 GFLOP/s on one 2-core machine within a minute, and the plans it
#: made ranged from 6 to 10 buckets for the same claim; the best of three read 62–68.
PROBE_READS = 3


@functools.cache
def _probe_flops_per_s() -> float:
    """This machine's FLOP rate for a first plan: the best of `PROBE_READS` short matmul reads
    (a short read is as slow as whatever else the machine did meanwhile)."""
    return max(matmul_peak_gflops(size=256, repeats=20) for _ in range(PROBE_READS)) * 1e9


def compiled_buckets(
    data: TrainData, monitor: tuple[str, bool], decay_every: int = 10
) -> frozenset[Bucket]:
    """The buckets with a program compiled (or compiling) in this process for this data and
    monitor."""
    return executables.compiled_buckets(
        data.x_train.shape[0], data.x_dev.shape[0], monitor, decay_every
    )


def cached_buckets(
    data: TrainData, monitor: tuple[str, bool], decay_every: int = 10
) -> frozenset[Bucket]:
    """The buckets with a program for this data and monitor in the persistent compilation cache
    (from an earlier process), not yet compiled in this one."""
    return executables.cached_buckets(
        data.x_train.shape[0], data.x_dev.shape[0], monitor, decay_every
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
    refill: Refill | None = None,
    on_end: TrialEnd | None = None,
    slots: int | None = None,
    data_seed: int = 0,
    group_size: int | None = None,
    monitor: tuple[str, bool] | None = None,
    decay_every: int = 10,
    keep_best: bool = True,
    bucket: Bucket | None = None,
    ahead: bool | None = None,
) -> BatchResult:
    """Train trials for up to `epochs` epochs each in one bucket's program of `slots` slots.

    `shape` is every trial's shape, or one per trial; `hparams` holds each trial's continuous
    hyperparameters (`HPARAM_DEFAULTS`). `bucket` defaults to the smallest one they fit and
    `slots` to one per given trial (rounded up to whole groups of `group_size`, one compiled
    call each; default: `default_group_size()`); given trials beyond the slots wait for one.
    After each round `callback` receives an `EpochReport` and may return a mask of trials to
    stop. Trials whose loss becomes non-finite stop as `diverged`; the others go on. A slot whose
    trial ended is taken by the next waiting trial, else by one of `refill(free slots)`, at once
    and on the device: every trial trains its own epochs (decay, dropout and data order), as it
    would alone; `on_end` is told the trials that left their slots in each round, with their
    outcomes and weights (the result then keeps none). `monitor` (metric, maximize) chooses
    each trial's best dev epoch, whose metrics and variables are returned; with
    `keep_best=False` the variables are those of the last epoch trained.

    With `ahead` (default: `default_dispatch_ahead()`), each round is dispatched before the
    host handles the last one's report, so the device trains while the callback runs. Results
    are the same; a trial the callback stops (or that diverged) trains one more round, which is
    discarded, and its slot takes a new trial one round later.
    """
    shapes = [shape] * len(hparams) if isinstance(shape, Shape) else list(shape)
    lane = Lane(shapes, hparams, bucket, slots, callback, refill, on_end)
    (result,) = train_buckets(
        [lane],
        data,
        epochs=epochs,
        data_seed=data_seed,
        group_size=group_size,
        monitor=monitor,
        decay_every=decay_every,
        keep_best=keep_best,
        ahead=ahead,
    )
    return result


@dataclass
class Lane:
    """One bucket's trials in a `train_buckets` loop, with callbacks of their own: each
    argument as `train_batch`'s of the same name.

    `on_error`, if given, is told an error the lane raised (in its program or its callbacks):
    the lane then leaves the loop and the other lanes go on. Without it, the error ends the
    loop."""

    shapes: Sequence[Shape]
    hparams: Sequence[Mapping[str, Any]]
    bucket: Bucket | None = None
    slots: int | None = None
    callback: EpochCallback | None = None
    refill: Refill | None = None
    on_end: TrialEnd | None = None
    on_error: Callable[[Exception], None] | None = None


#: Asked after every round of `train_buckets` for new lanes to train beside the others (none:
#: nothing to add now); told whether any lane is training or about to (its program compiling).
MoreLanes = Callable[[bool], Sequence[Lane]]


def train_buckets(
    lanes: Sequence[Lane],
    data: TrainData,
    *,
    epochs: int,
    more: MoreLanes | None = None,
    data_seed: int = 0,
    group_size: int | None = None,
    monitor: tuple[str, bool] | None = None,
    decay_every: int = 10,
    keep_best: bool = True,
    ahead: bool | None = None,
) -> list[BatchResult]:
    """Train several buckets' lanes side by side in one round loop; one `BatchResult` per
    lane, in the order the lanes came (the given ones, then those `more` added).

    Each lane trains as `train_batch` would train it alone, with the same results: its own
    program, slots, callbacks and refills. A round reports the lanes one by one, each dispatching
    its next round as soon as its callbacks are done, so the device trains the other lanes
    while the host reports one. A lane whose program is still compiling (`compile_ahead`) joins
    the loop when it is ready, or at once, waiting for it, when no other lane is training.
    After each round, `more(training)` may add lanes (trials that fit none of the buckets in
    training); the loop ends when no lane is left to train and `more` adds none.
    """
    options = _LaneOptions(epochs, data_seed, group_size, monitor, decay_every, keep_best, ahead)
    placed = _PlacedData(data)
    runs = [_LaneRun(lane, placed, options) for lane in lanes]
    waiting, training = list(runs), list[_LaneRun]()
    while True:
        for run in list(waiting):  # the first lane waits for its compile if none trains
            if run.ready() or not training:
                waiting.remove(run)
                run.guarded(run.start)
                training += [] if run.done else [run]
        for run in list(training):
            run.guarded(run.step)
            if run.done:
                training.remove(run)
        new = more(bool(training or waiting)) if more is not None else []
        if not (training or waiting or new):
            return [run.result() for run in runs]
        added = [_LaneRun(lane, placed, options) for lane in new]
        runs += added
        waiting += added


class _PlacedData:
    """`data` on the devices of each placement the lanes of one loop use, placed once: lanes on
    the same number of devices share one copy."""

    def __init__(self, data: TrainData) -> None:
        self.data = data
        self._by_devices: dict[int, TrainData] = {}

    def on(self, placement: Placement) -> TrainData:
        if placement.devices not in self._by_devices:
            self._by_devices[placement.devices] = _placed(placement, self.data)
        return self._by_devices[placement.devices]


class _LaneOptions(NamedTuple):
    """`train_buckets`' arguments that every lane shares."""

    epochs: int
    data_seed: int
    group_size: int | None
    monitor: tuple[str, bool] | None
    decay_every: int
    keep_best: bool
    ahead: bool | None


class _LaneRun:
    """One lane in `train_buckets`' loop: its slot run and its round in flight."""

    def __init__(self, lane: Lane, placed: _PlacedData, options: _LaneOptions) -> None:
        shapes, hparams = list(lane.shapes), lane.hparams
        layout = _Layout.of(
            shapes,
            hparams,
            placed.data,
            lane.slots,
            options.group_size,
            options.monitor,
            options.decay_every,
            lane.bucket,
            options.ahead,
        )
        self.lane, self.keep_best = lane, options.keep_best
        self.ahead = not layout.key.donated
        self.run = _SlotRun(
            layout.bucket,
            placed.on(layout.placement),
            layout.placement,
            layout.key,
            groups=layout.groups,
            epochs=options.epochs,
            data_seed=options.data_seed,
            on_end=lane.on_end,
        )
        self.run.add(shapes, hparams)
        self.refilling = lane.refill is not None
        self.pending: _Round | None = None
        self.started = False

    @property
    def done(self) -> bool:
        return self.started and self.pending is None

    def ready(self) -> bool:
        """Whether the lane can start without waiting for the background compile of its
        program: compiled, or not compiling there (it compiles as it starts)."""
        key = self.run.key
        return executables.is_compiled(key) or not executables.is_compiling(key)

    def guarded(self, action: Callable[[], None]) -> None:
        """Run `action`; an error it raises goes to the lane's `on_error`, if any, and ends the
        lane (else it ends the loop)."""
        try:
            action()
        except Exception as error:
            if self.lane.on_error is None:
                raise
            self.started, self.pending = True, None
            self.lane.on_error(error)

    def start(self) -> None:
        """Seat the lane's trials and dispatch its first round."""
        self.started = True
        self.run.seat()
        self.pending = self.run.dispatch(1)

    def step(self) -> None:
        """Report the round in flight, end and refill trials, dispatch the next round."""
        run, pending, lane = self.run, self.pending, self.lane
        assert pending is not None, "a lane that is done takes no step"
        following = None
        if self.ahead and not run.compacts(expecting=self.refilling):
            following = run.dispatch(pending.number + 1, ahead=True)
        report = run.report(pending)
        callback = lane.callback
        stop = callback(report) if callback is not None and report.trained.any() else None
        run.end_trials(report, stop, self.keep_best)
        free = run.capacity - run.live - len(run.waiting)
        if self.refilling and free > 0 and lane.refill is not None:
            new = list(lane.refill(free))
            self.refilling = bool(new)
            if new:
                run.add([s for s, _ in new], [h for _, h in new])
        if following is None:
            run.compact(expecting=self.refilling)
        run.seat()
        self.pending = following or run.dispatch(pending.number + 1)

    def result(self) -> BatchResult:
        run = self.run
        return BatchResult(
            run.bucket, run.shapes, run.results(), run.kept, run.occupancy, run.traffic
        )


def compile_ahead(
    shape: Shape | Sequence[Shape],
    hparams: Sequence[Mapping[str, Any]],
    data: TrainData,
    *,
    slots: int | None = None,
    group_size: int | None = None,
    monitor: tuple[str, bool] | None = None,
    decay_every: int = 10,
    bucket: Bucket | None = None,
    ahead: bool | None = None,
    refills: bool = True,
) -> Future[None] | None:
    """Start compiling, in a background thread, the program `train_batch` called with these
    arguments would train with; None when it is compiled or compiling already. Cancel the
    future to drop a compile that has not started.

    With `refills` (trials may join the bucket's slots as others leave), the small programs
    that write a slot and read one back are compiled too (a fraction of a second each), so the
    first trial to join does not wait for them; without, they are left out."""
    shapes = [shape] * len(hparams) if isinstance(shape, Shape) else list(shape)
    layout = _Layout.of(
        shapes, hparams, data, slots, group_size, monitor, decay_every, bucket, ahead
    )

    def lower() -> jax.stages.Lowered:
        place = layout.placement
        run = _SlotRun(layout.bucket, _placed(place, data), place, layout.key, groups=1, epochs=1)
        run.add(shapes[:1], hparams[:1])
        run.seat()
        lowered = run.lower(run.groups[0])
        if refills:
            warm_slot_programs(place, run.groups[0], run.fresh(0), run.rows[0])
        return lowered

    return executables.compile_ahead(layout.key, lower, RATES.record_compile)


def _placed(placement: Placement, data: TrainData) -> TrainData:
    """`data` on every device of `placement`."""
    x_train, y_train, x_dev, y_dev = placement.replicate(
        (data.x_train, data.y_train, data.x_dev, data.y_dev)
    )
    return TrainData(x_train, y_train, x_dev, y_dev, target_std=data.target_std)


class _Layout(NamedTuple):
    """How `train_batch` lays its trials out: bucket, devices, groups and program."""

    bucket: Bucket
    placement: Placement
    groups: int
    key: ProgramKey

    @classmethod
    def of(
        cls,
        shapes: Sequence[Shape],
        hparams: Sequence[Mapping[str, Any]],
        data: TrainData,
        slots: int | None,
        group_size: int | None,
        monitor: tuple[str, bool] | None,
        decay_every: int,
        bucket: Bucket | None,
        ahead: bool | None,
    ) -> _Layout:
        """`train_batch`'s layout for its arguments (see there); ValueError for bad ones."""
        if len(shapes) != len(hparams):
            raise ValueError(f"{len(shapes)} shapes for {len(hparams)} trials")
        bucket = bucket or Bucket.envelope(shapes)
        train_rows = data.x_train.shape[0]
        if train_rows // bucket.batch_size < 1:
            raise ValueError(
                f"batch_size {bucket.batch_size} exceeds the {train_rows} training examples"
            )
        ahead = default_dispatch_ahead() if ahead is None else ahead
        slots = max(1, slots or len(shapes))
        placement = Placement.local(slots)
        key_of = functools.partial(
            ProgramKey,
            bucket,
            monitor or default_monitor(bucket.task),
            decay_every,
            train_rows=train_rows,
            dev_rows=data.x_dev.shape[0],
            devices=placement.devices,
            donated=not ahead,
        )
        size = _group_size(placement, min(group_size or default_group_size(), slots), key_of)
        return cls(bucket, placement, -(-slots // size), key_of(size))


def _group_size(placement: Placement, wanted: int, key_of: Callable[[int], ProgramKey]) -> int:
    """The group size of a batch: `wanted` rounded up to the devices, or the smallest larger one
    this bucket already has a program for (a few repeated slots cost less than a compile)."""
    size = placement.round_up(max(1, wanted))
    compiled = executables.compiled_group_sizes(key_of)
    return min((g for g in compiled if g >= size), default=size)


@dataclass
class _Round:
    """One dispatched call of the bucket's program per group: what the report will read."""

    number: int
    started: float  # when it was dispatched (perf_counter)
    calls: list[tuple[Group, np.ndarray, dict[str, jax.Array]]]  # group, its trained
    # occupants (EMPTY where a slot ran as padding), the metrics (on the device)


class _SlotRun:
    """The trials of one lane (one bucket's, see `train_buckets`) and the slots they train in
    (`models.slots`)."""

    def __init__(
        self,
        bucket: Bucket,
        data: TrainData,
        placement: Placement,
        program_key: ProgramKey,
        *,
        groups: int,
        epochs: int,
        data_seed: int = 0,
        on_end: TrialEnd | None = None,
    ) -> None:
        self.bucket, self.data, self.placement = bucket, data, placement
        self.on_end = on_end
        self.key, self.max_groups, self.data_seed = program_key, groups, data_seed
        self.epochs = epochs
        self.capacity = groups * program_key.group_size
        self.programs = _programs(
            bucket, program_key.monitor, program_key.decay_every, program_key.donated
        )
        self.steps = data.x_train.shape[0] // bucket.batch_size
        self.flops_per_slot = epoch_flops(bucket, data.x_train.shape[0], data.x_dev.shape[0])
        self.shapes: list[Shape] = []
        self.rows: list[dict[str, np.ndarray]] = []
        self.hparams: list[Mapping[str, Any]] = []
        self.status: list[TrialStatus] = []
        self.history: list[list[dict[str, float]]] = []
        self.kept: list[tuple[dict, dict]] = []
        self.best_epoch: list[int] = []
        self.ended: list[bool] = []
        self.waiting: deque[int] = deque()
        self.groups: list[Group] = []
        self.slot_rounds = self.live_rounds = 0
        self.traffic = Traffic()
        self.reported_at = 0.0  # when the last report's metrics arrived (perf_counter)

    @property
    def live(self) -> int:
        return sum(int(g.live.sum()) for g in self.groups)

    @property
    def occupancy(self) -> float:
        return self.live_rounds / self.slot_rounds if self.slot_rounds else 1.0

    def add(self, shapes: Sequence[Shape], hparams: Sequence[Mapping[str, Any]]) -> None:
        """New trials, waiting for a slot; ValueError for one that does not fit the bucket."""
        arrays = trial_arrays(self.bucket, shapes, hparams)
        for index, (shape, values) in enumerate(zip(shapes, hparams, strict=True)):
            self.waiting.append(len(self.shapes))
            self.shapes.append(shape)
            self.hparams.append(values)
            self.rows.append({name: column[index] for name, column in arrays.items()})
            self.status.append("completed")
            self.history.append([])
            self.kept.append(({}, {}))
            self.best_epoch.append(0)
            self.ended.append(False)

    def fresh(self, trial: int) -> TrialState:
        return init_trial(self.bucket, self.shapes[trial], self.hparams[trial])

    def seat(self) -> None:
        """Waiting trials take the free slots, then new groups up to the program's slots."""
        size = self.key.group_size
        for group in self.groups:
            for slot in np.flatnonzero(~group.live):
                if not self.waiting:
                    return
                trial = self.waiting.popleft()
                write_slot(self.placement, group, slot, trial, self.fresh(trial), self.rows[trial])
                self.traffic.slot_writes += 1
        while self.waiting and len(self.groups) < self.max_groups:
            members = [self.waiting.popleft() for _ in range(min(size, len(self.waiting)))]
            self.groups += build_groups(
                self.placement, size, members, self.fresh, self.rows.__getitem__
            )

    def dispatch(self, number: int, *, ahead: bool = False) -> _Round | None:
        """Round `number`: one epoch of every live trial (each its own), queued on the device;
        None when no trial is left to train.

        `ahead`: the last round is not reported yet, and its trials that finish their epochs
        there are left out (their slots run as padding).
        """
        size = self.key.group_size
        started = time.perf_counter()
        calls = []
        for group in self.groups:
            occupants = group.occupants.copy()
            if ahead:
                occupants[group.epochs >= self.epochs] = EMPTY
            training = occupants != EMPTY
            if not training.any():
                continue
            ready = executables.is_compiled(self.key)
            args = self._arguments(group)
            program = executables.executable(
                self.key, functools.partial(self.programs.epoch.lower, *args), RATES.record_compile
            )
            if not ready:
                started = time.perf_counter()
            group.previous = None if self.key.donated else group.state
            group.state, metrics = program(*args)
            group.round = number
            group.epochs[training] += 1
            calls.append((group, occupants, metrics))
        self.slot_rounds += len(calls) * size
        self.traffic.epoch_calls += len(calls)
        return _Round(number, started, calls) if calls else None

    def _arguments(self, group: Group) -> tuple:
        """The epoch program's arguments for `group`'s next round."""
        data = self.data
        order, epochs = self.placement.shard(
            (
                np.stack([self._order(int(e)) for e in group.epochs]),
                group.epochs.astype(np.int32),
            )
        )
        target_std = jnp.float32(data.target_std)
        train, dev = (data.x_train, data.y_train), (data.x_dev, data.y_dev)
        return (group.state, group.hparams, *train, order, *dev, epochs, target_std)

    def lower(self, group: Group) -> jax.stages.Lowered:
        """The bucket's epoch program lowered for `group`'s arguments (to compile it ahead)."""
        return self.programs.epoch.lower(*self._arguments(group))

    def report(self, round_: _Round) -> EpochReport:
        """Round `round_`'s metrics, fetched, for the trials it trained that are still live."""
        fetched = jax.device_get([metrics for _, _, metrics in round_.calls])
        self.traffic.rounds += 1
        self.traffic.host_reads += 1
        count = len(self.shapes)
        names = fetched[0].keys()
        metrics = {name: np.full(count, np.nan) for name in names}
        trained = np.zeros(count, bool)
        epochs = np.zeros(count, int)
        ended = np.asarray(self.ended)
        for (_, occupants, _), values in zip(round_.calls, fetched, strict=True):
            slots = np.flatnonzero(occupants != EMPTY)
            slots = slots[~ended[occupants[slots]]]
            members = occupants[slots]
            trained[members] = True
            epochs[members] = [len(self.history[t]) + 1 for t in members]
            for name in names:
                metrics[name][members] = values[name][slots]
        for trial in np.flatnonzero(trained):
            self.history[trial].append({name: float(v[trial]) for name, v in metrics.items()})
        now = time.perf_counter()
        flops = len(round_.calls) * self.key.group_size * self.flops_per_slot
        RATES.record_epoch(flops, now - max(round_.started, self.reported_at))
        self.reported_at = now
        self.live_rounds += int(trained.sum())
        finite = np.isfinite(metrics["train_loss"]) & np.isfinite(metrics["dev_loss"])
        return EpochReport(round_.number, epochs, metrics, trained, trained & ~finite)

    def end_trials(self, report: EpochReport, stop: np.ndarray | None, keep_best: bool) -> None:
        """Trials that diverged, were stopped or trained their epochs in `report`'s round leave
        their slots, with their state as that round left it."""
        stopped = np.zeros(len(self.shapes), bool)
        if stop is not None:
            stop = np.asarray(stop, bool)
            stopped[: stop.size] = stop[: stopped.size]
        ended: list[EndedTrial] = []
        for group in self.groups:
            for slot in np.flatnonzero(group.live):
                trial = int(group.occupants[slot])
                if not report.trained[trial]:
                    continue
                if report.diverged[trial]:
                    self.status[trial] = "diverged"
                elif report.epochs[trial] >= self.epochs:
                    self.status[trial] = "completed"
                elif stopped[trial]:
                    self.status[trial] = "stopped"
                else:
                    continue
                ended += self._keep(trial, read_slot(group, slot, report.round), keep_best)
                self.traffic.host_reads += 1
                group.occupants[slot] = EMPTY
                self.ended[trial] = True
        if ended:
            assert self.on_end is not None  # `_keep` hands trials on only to `on_end`
            self.on_end(ended)

    def compacts(self, *, expecting: bool) -> bool:
        """Whether the trials that go on after the round to be reported (those with epochs left)
        would move into fewer groups: then no round is dispatched ahead, so that `compact` can."""
        if expecting or self.waiting:
            return False
        going_on = sum(
            int(((g.occupants != EMPTY) & (g.epochs < self.epochs)).sum()) for g in self.groups
        )
        return self._fits_fewer_groups(going_on)

    def _fits_fewer_groups(self, trials: int) -> bool:
        """Whether `trials` fit in fewer groups than those holding live trials now."""
        return -(-trials // self.key.group_size) < sum(bool(g.live.any()) for g in self.groups)

    def compact(self, *, expecting: bool) -> None:
        """With no trial waiting or expected, move the live trials into fewer groups when they
        fit (through the host, once per group saved); groups with no trial are dropped."""
        self.groups = [g for g in self.groups if g.live.any()]
        size = self.key.group_size
        if expecting or self.waiting or not self._fits_fewer_groups(self.live):
            return
        epochs = {
            int(trial): int(epoch)
            for group in self.groups
            for trial, epoch in zip(group.occupants, group.epochs, strict=True)
            if trial != EMPTY
        }
        states = read_groups(self.groups)
        self.traffic.host_reads += 1
        self.groups = build_groups(
            self.placement,
            size,
            list(states),
            states.__getitem__,
            self.rows.__getitem__,
            epochs.__getitem__,
        )

    def results(self) -> list[TrialResult]:
        """Every trial's outcome, in the order the trials came."""
        return [self._result(trial) for trial in range(len(self.shapes))]

    def _result(self, trial: int) -> TrialResult:
        history, best = self.history[trial], self.best_epoch[trial]
        return TrialResult(
            status=self.status[trial],
            epochs=len(history),
            best_epoch=best or None,
            best=history[best - 1] if best else {},
            history=history,
        )

    def _keep(self, trial: int, state: TrialState, keep_best: bool) -> list[EndedTrial]:
        """Keep the trial's weights for its result, or, with `on_end`, the trial to tell it."""
        self.best_epoch[trial] = int(state.best_epoch)
        kept = (state.best_params, state.best_stats) if keep_best else (state.params, state.stats)
        if self.on_end is None:
            self.kept[trial] = kept
            return []
        # Told trials' weights go to `on_end` alone: a long stream holds only those it keeps.
        variables = functools.partial(real_variables, self.shapes[trial], *kept)
        return [EndedTrial(trial, self._result(trial), variables)]

    def _order(self, epoch: int) -> np.ndarray:
        return _epoch_order(
            self.data_seed,
            epoch,
            self.steps * self.bucket.batch_size,
            self.data.x_train.shape[0],
        ).reshape(self.steps, self.bucket.batch_size)


@functools.lru_cache(maxsize=1024)
def _epoch_order(data_seed: int, epoch: int, size: int, examples: int) -> np.ndarray:
    """A trial's epoch's shuffled example order, the same for every trial at that epoch of its
    own (common random numbers)."""
    order = np.random.default_rng([data_seed, epoch]).permutation(examples)[:size]
    order = order.astype(np.int32)
    order.flags.writeable = False
    return order


class _Programs(NamedTuple):
    epoch: jax.stages.Wrapped


@functools.lru_cache(maxsize=256)
def _programs(
    bucket: Bucket, monitor: tuple[str, bool], decay_every: int, donated: bool
) -> _Programs:
    """The jitted functions of one bucket: built once, so their compile caches persist."""
    epoch = functools.partial(train_epoch, bucket, monitor, decay_every)
    return _Programs(
        epoch=jax.jit(
            jax.vmap(epoch, in_axes=(0, 0, None, None, 0, None, None, 0, None)),
            donate_argnums=0 if donated else (),
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
    return evaluate_splits(shape, variables, {"": (x, y)}, target_std)[""]


def evaluate_splits(
    shape: Shape,
    variables: dict,
    splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
    target_std: float = 1.0,
) -> dict[str, dict[str, float]]:
    """`evaluate` on each named (x, y) split, as one compiled program (one compile for the
    train, dev and test figures of a model instead of one per split's size)."""
    names = list(splits)
    x = np.concatenate([np.asarray(splits[name][0], np.float32) for name in names])
    y = np.concatenate([np.asarray(splits[name][1]) for name in names])
    ends = tuple(int(end) for end in np.cumsum([len(splits[name][1]) for name in names]))
    found = _evaluation(shape, ends)(variables, jnp.asarray(x), jnp.asarray(y), target_std)
    return {
        name: {metric: float(value) for metric, value in metrics.items()}
        for name, metrics in zip(names, found, strict=True)
    }


@functools.lru_cache(maxsize=64)
def _evaluation(shape: Shape, ends: tuple[int, ...]) -> Callable:
    """`evaluate_splits`' jitted maths for one shape and splits ending at rows `ends` (eagerly,
    each operation would compile alone)."""

    def metrics(variables, x, y, target_std):
        out = cast(jax.Array, shape.model.apply(variables, x, train=False))  # no mutable state
        starts = (0, *ends[:-1])
        return [
            output_metrics(shape.task, out[start:end], y[start:end], target_std)
            for start, end in zip(starts, ends, strict=True)
        ]

    return jax.jit(metrics)


def predict(shape: Shape, variables: dict, x: np.ndarray) -> np.ndarray:
    """Class ids (classification) or predictions in the model's target units (regression)."""
    out = np.asarray(shape.model.apply(variables, jnp.asarray(x, jnp.float32), train=False))
    return out.argmax(-1) if shape.task == "classification" else out[:, 0]
