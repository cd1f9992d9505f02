"""Train K trials of one static shape together as one compiled JAX program.

A *shape* is everything that changes the compiled program (layer widths, activation, batch norm,
optimizer family, minibatch size, task, input and output sizes). Everything else that varies
between trials is an array with a leading trial axis, so one compile serves every trial of a shape.

Per epoch, the training set is shuffled once for the whole batch (common random numbers) and laid
out as [steps, batch, features]; trials train in groups of `group_size`, each group one call of a
jitted program that scans the minibatches of a vmapped train step and then evaluates on dev.
Stopped and diverged trials leave the groups, so they stop costing compute.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.mlp import (
    INITS,
    MLP,
    count_parameters,
    init_variables,
    kernel_mask,
    sum_squared_weights,
)
from models.optim import LR_DECAYS, OPTIMIZERS, lr_factor, make_optimizer, set_hyperparams

Task = Literal["classification", "regression"]

#: Continuous (traced) hyperparameters and their defaults; `lr_decay` and `init` are names
#: turned into integer codes, so they are traced too.
HPARAM_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "momentum": 0.9,
    "beta2": 0.999,
    "epsilon": 1e-8,
    "l2": 0.0,
    "dropout": 0.0,
    "decay_rate": 0.0,
    "lr_decay": "none",
    "init": "he",
    "seed": 0,
}

#: How many trials one compiled call trains at once. On a 2-core CPU, groups of 2-8 trials beat
#: one group of 32 (the working set stays in cache); `bench/engine.py --group-sizes` measures it.
DEFAULT_GROUP_SIZE = 4


@dataclass(frozen=True)
class Shape:
    """What the compiled program depends on; trials of equal Shape train together."""

    input_dim: int
    num_outputs: int
    hidden: tuple[int, ...]
    activation: str = "relu"
    batch_norm: bool = False
    optimizer: str = "adam"
    batch_size: int = 128
    task: Task = "classification"
    use_dropout: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"unknown task {self.task!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")

    @property
    def model(self) -> MLP:
        return MLP(
            hidden=self.hidden,
            num_outputs=self.num_outputs,
            activation=self.activation,
            batch_norm=self.batch_norm,
            use_dropout=self.use_dropout,
        )

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.input_dim, self.hidden, self.num_outputs)

    def forward_flops(self, examples: int) -> int:
        """Multiply-adds ×2 of one forward pass over `examples` rows."""
        widths = (self.input_dim, *self.hidden, self.num_outputs)
        return 2 * examples * sum(a * b for a, b in itertools.pairwise(widths))


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
    """Outcome of `train_batch`: per-trial results and the best-epoch variables of every trial."""

    shape: Shape
    trials: list[TrialResult]
    variables: dict  # {"params": ..., "batch_stats": ...}, numpy arrays with a leading trial axis

    def trial_variables(self, index: int) -> dict:
        """The best-epoch variables of one trial, without the trial axis."""
        return jax.tree_util.tree_map(lambda a: a[index], self.variables)


class _TrialState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any
    best_params: Any
    best_batch_stats: Any
    best_score: jax.Array
    best_epoch: jax.Array


def stack_hparams(trials: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack K trials' continuous hyperparameters into arrays with a leading trial axis.

    Missing values take `HPARAM_DEFAULTS`; `lr_decay` and `init` names become integer codes.
    """
    columns: dict[str, list] = {name: [] for name in HPARAM_DEFAULTS}
    for trial in trials:
        unknown = set(trial) - set(HPARAM_DEFAULTS)
        if unknown:
            raise ValueError(f"not continuous hyperparameters: {sorted(unknown)}")
        for name, default in HPARAM_DEFAULTS.items():
            columns[name].append(trial.get(name, default))
    stacked = {
        name: np.asarray(values, np.float32)
        for name, values in columns.items()
        if name not in ("lr_decay", "init", "seed")
    }
    for name, choices in (("lr_decay", LR_DECAYS), ("init", INITS)):
        stacked[name] = np.asarray([_code(choices, v, name) for v in columns[name]], np.int32)
    stacked["seed"] = np.asarray(columns["seed"], np.uint32)
    return stacked


def _code(names: tuple[str, ...], value: Any, what: str) -> int:
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; expected one of {names}")
    return names.index(value)


def default_monitor(task: Task) -> tuple[str, bool]:
    """The dev metric that picks a trial's best epoch, and whether higher is better."""
    return ("dev_accuracy", True) if task == "classification" else ("dev_mse", False)


def train_batch(
    shape: Shape,
    hparams: Mapping[str, np.ndarray] | Sequence[Mapping[str, Any]],
    data: TrainData,
    *,
    epochs: int,
    callback: EpochCallback | None = None,
    data_seed: int = 0,
    group_size: int = DEFAULT_GROUP_SIZE,
    monitor: tuple[str, bool] | None = None,
    decay_every: int = 10,
    keep_best: bool = True,
) -> BatchResult:
    """Train K trials of `shape` together for up to `epochs` epochs.

    `hparams` is either K per-trial dicts or the output of `stack_hparams`. After each epoch
    `callback` receives an `EpochReport` and may return a mask of trials to stop. Trials whose
    loss becomes non-finite stop as `diverged`; the others go on. `monitor` (metric, maximize)
    chooses each trial's best dev epoch, whose metrics and variables are returned; with
    `keep_best=False` the variables are those of the last epoch trained.
    """
    hp = hparams if isinstance(hparams, Mapping) else stack_hparams(hparams)
    hp = {name: np.asarray(value) for name, value in hp.items()}
    num_trials = int(hp["learning_rate"].shape[0])
    steps = data.x_train.shape[0] // shape.batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size {shape.batch_size} exceeds the {data.x_train.shape[0]} training examples"
        )
    monitor = monitor or default_monitor(shape.task)
    program = _programs(shape, monitor, decay_every)

    active = np.ones(num_trials, bool)
    status: list[TrialStatus] = ["completed"] * num_trials
    epochs_done = np.zeros(num_trials, int)
    history: list[list[dict[str, float]]] = [[] for _ in range(num_trials)]
    placement = _Placement.local(num_trials)
    group_size = placement.round_up(max(1, min(group_size, num_trials)))
    data = placement.replicate(data)

    # Trial states live in groups on the devices (the trial axis sharded across them); a trial's
    # state is parked on the host when its group is re-formed (a trial stopped) and is where the
    # final variables are read from.
    parked: dict[int, _TrialState] = {}
    groups = []
    for members, slots in _partition(np.arange(num_trials), group_size):
        group_hp = placement.shard(_rows(hp, slots))
        # init's compiler may replicate some outputs; the epoch program returns them sharded, so
        # shard them now, or its second call would compile again for the new layout.
        state = placement.shard(program.init(group_hp))
        groups.append(_Group(members, state, group_hp))
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
        xs, ys = program.shuffle(
            data.x_train,
            data.y_train,
            _epoch_order(data_seed, epoch, steps * shape.batch_size, data.x_train.shape[0]),
        )
        pending = []
        for group in groups:
            group.state, metrics = program.epoch(
                group.state,
                group.hparams,
                xs,
                ys,
                data.x_dev,
                data.y_dev,
                jnp.int32(epoch),
                jnp.float32(data.target_std),
            )
            pending.append((group.members, metrics))
        report = _report(epoch + 1, num_trials, pending)
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
    variables = {"params": state.best_params if keep_best else state.params}
    if shape.batch_norm:
        variables["batch_stats"] = state.best_batch_stats if keep_best else state.batch_stats
    return BatchResult(shape=shape, trials=trials, variables=variables)


@dataclass(frozen=True)
class _Placement:
    """Where a batch lives: the trial axis sharded across this host's devices, data replicated.

    With one device this is plain placement on it; with several, every group holds a multiple
    of the device count, and the compiled program runs each device's trials on that device.
    """

    trials: jax.sharding.Sharding | None
    replicated: jax.sharding.Sharding | None
    devices: int

    @classmethod
    def local(cls, num_trials: int) -> _Placement:
        """This host's devices, at most one per trial (a device with no trial would only pad)."""
        devices = jax.local_devices()[: max(1, num_trials)]
        if len(devices) == 1:
            return cls(None, None, 1)
        mesh = jax.sharding.Mesh(np.asarray(devices), ("trials",))
        return cls(
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("trials")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            len(devices),
        )

    def round_up(self, group_size: int) -> int:
        return -(-group_size // self.devices) * self.devices

    def shard(self, tree):
        return jax.device_put(tree, self.trials)

    def replicate(self, data: TrainData) -> TrainData:
        if self.replicated is None:
            return data
        arrays = jax.device_put(
            (data.x_train, data.y_train, data.x_dev, data.y_dev), self.replicated
        )
        return TrainData(*arrays, target_std=data.target_std)


@dataclass
class _Group:
    """Trials trained by one compiled call; a short group is padded with repeats of its members."""

    members: np.ndarray
    state: _TrialState
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


def _park(groups: list[_Group], parked: dict[int, _TrialState]) -> None:
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
    init: Callable
    shuffle: Callable
    epoch: Callable
    evaluate: Callable


@functools.lru_cache(maxsize=64)
def _programs(shape: Shape, monitor: tuple[str, bool], decay_every: int) -> _Programs:
    """The jitted functions of one shape: built once, so their compile caches persist."""
    model = shape.model
    batch = shape.batch_size
    metric_name, maximize = monitor
    classify = shape.task == "classification"

    def variables(params, batch_stats):
        return (
            {"params": params, "batch_stats": batch_stats}
            if shape.batch_norm
            else {"params": params}
        )

    tx = make_optimizer(shape.optimizer, kernel_mask(_param_template(model, shape)))

    def init_one(hp):
        key = jax.random.fold_in(jax.random.PRNGKey(hp["seed"]), 1)
        variables_ = init_variables(model, shape.input_dim, key, hp["init"])
        params = variables_["params"]
        batch_stats = variables_.get("batch_stats", {})
        opt_state = set_hyperparams(tx.init(params), _optimizer_values(hp, shape))
        score = jnp.asarray(-jnp.inf, jnp.float32)
        return _TrialState(params, batch_stats, opt_state, params, batch_stats, score, jnp.int32(0))

    def epoch_one(state: _TrialState, hp, xs, ys, x_dev, y_dev, epoch, target_std):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(hp["seed"]), 2), epoch)
        lr = hp["learning_rate"] * lr_factor(hp["lr_decay"], hp["decay_rate"], epoch, decay_every)
        opt_state = set_hyperparams(state.opt_state, {"learning_rate": lr})
        # L2 as (λ/2m)·Σ‖W‖² in each minibatch's cost; adamw applies it as decoupled decay instead.
        l2_coef = 0.0 if shape.optimizer == "adamw" else hp["l2"] / (2.0 * batch)

        def step(carry, minibatch):
            params, batch_stats, opt_state, index = carry
            xb, yb = minibatch

            def cost(p):
                out, updated = model.apply(
                    variables(p, batch_stats),
                    xb,
                    train=True,
                    dropout_rate=hp["dropout"],
                    rngs={"dropout": jax.random.fold_in(key, index)},
                    mutable=["batch_stats"] if shape.batch_norm else [],
                )
                loss, metric = data_loss(shape.task, out, yb, target_std)
                new_stats = updated["batch_stats"] if shape.batch_norm else batch_stats
                return loss + l2_coef * sum_squared_weights(p), (loss, metric, new_stats)

            grads, (loss, metric, batch_stats) = jax.grad(cost, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, batch_stats, opt_state, index + 1), (loss, metric)

        carry = (state.params, state.batch_stats, opt_state, jnp.int32(0))
        (params, batch_stats, opt_state, _), (losses, train_metric) = jax.lax.scan(
            step, carry, (xs, ys)
        )
        dev = evaluate_one(variables(params, batch_stats), x_dev, y_dev, target_std)
        metrics = {"train_loss": losses.mean(), **dev}
        metrics["train_accuracy" if classify else "train_mse"] = train_metric.mean()
        score = metrics[metric_name] if maximize else -metrics[metric_name]
        improved = jnp.isfinite(score) & (score > state.best_score)

        def keep(new, old):
            return jax.tree_util.tree_map(lambda n, o: jnp.where(improved, n, o), new, old)

        new_state = _TrialState(
            params,
            batch_stats,
            opt_state,
            keep(params, state.best_params),
            keep(batch_stats, state.best_batch_stats),
            jnp.where(improved, score, state.best_score),
            jnp.where(improved, epoch + 1, state.best_epoch),
        )
        return new_state, metrics

    def evaluate_one(variables_, x, y, target_std):
        out = model.apply(variables_, x, train=False)
        loss, metric = data_loss(shape.task, out, y, target_std)
        if classify:
            return {"dev_loss": loss, "dev_accuracy": metric}
        r2 = 1.0 - jnp.sum(jnp.square(out[:, 0] - y)) / jnp.sum(jnp.square(y - y.mean()))
        return {"dev_loss": loss, "dev_mse": metric, "dev_r2": r2}

    def shuffle(x, y, order):
        steps = order.shape[0] // batch
        return (
            x[order].reshape(steps, batch, x.shape[1]),
            y[order].reshape(steps, batch, *y.shape[1:]),
        )

    return _Programs(
        init=jax.jit(jax.vmap(init_one), compiler_options=_cpu_options()),
        shuffle=jax.jit(shuffle),
        epoch=jax.jit(
            jax.vmap(epoch_one, in_axes=(0, 0, None, None, None, None, None, None)),
            donate_argnums=0,
            compiler_options=_cpu_options(),
        ),
        evaluate=jax.jit(evaluate_one),
    )


def data_loss(task: Task, out: jax.Array, y: jax.Array, target_std=1.0):
    """(loss, metric) of a minibatch: softmax cross-entropy and accuracy, or MSE twice.

    The regression metric is the MSE on the original target scale (`target_std` undoes the
    standardisation); the loss stays on the standardised scale the model trains on.
    """
    if task == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return loss, jnp.mean(jnp.argmax(out, -1) == y)
    mse = jnp.mean(jnp.square(out[:, 0] - y))
    return mse, mse * target_std**2


def initial_variables(shape: Shape, hparams: Sequence[Mapping[str, Any]]) -> dict:
    """The variables `train_batch` starts from for these trials (stacked on the trial axis)."""
    state = _programs(shape, default_monitor(shape.task), 10).init(
        {k: jnp.asarray(v) for k, v in stack_hparams(hparams).items()}
    )
    variables = {"params": state.params}
    if shape.batch_norm:
        variables["batch_stats"] = state.batch_stats
    return jax.device_get(variables)


def _cpu_options() -> dict[str, str] | None:
    """XLA options for the init and epoch programs: on the CPU, LLVM's optimisation level 1.

    Measured on MNIST-1D 40→256→256→10 (bench/engine.py): it halves the compile (3.3 s → 1.5 s)
    and leaves the steady epoch time unchanged; level 0 doubles the epoch time.
    """
    return {"xla_backend_optimization_level": "1"} if jax.default_backend() == "cpu" else None


def _param_template(model: MLP, shape: Shape):
    """Parameter structure (shapes only) of `model`, for masks built before any trial exists."""
    sample = jax.ShapeDtypeStruct((1, shape.input_dim), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), sample)[
        "params"
    ]


def _optimizer_values(hp: Mapping[str, jax.Array], shape: Shape) -> dict[str, jax.Array]:
    values = {name: hp[name] for name in ("learning_rate", "momentum", "beta2", "epsilon")}
    values["weight_decay"] = hp["l2"] / shape.batch_size  # adamw: the same decay as (λ/2m)·‖W‖²
    return values


def evaluate(
    shape: Shape, variables: dict, x: np.ndarray, y: np.ndarray, target_std: float = 1.0
) -> dict[str, float]:
    """Metrics of one trained model (eval mode: no dropout, batch-norm running averages).

    Keys are `loss` and `accuracy` (classification) or `loss`, `mse`, `r2` (regression).
    """
    program = _programs(shape, default_monitor(shape.task), 10)
    out = program.evaluate(variables, jnp.asarray(x, jnp.float32), jnp.asarray(y), target_std)
    return {name.removeprefix("dev_"): float(value) for name, value in out.items()}


def predict(shape: Shape, variables: dict, x: np.ndarray) -> np.ndarray:
    """Class ids (classification) or predictions in the model's target units (regression)."""
    out = np.asarray(shape.model.apply(variables, jnp.asarray(x, jnp.float32), train=False))
    return out.argmax(-1) if shape.task == "classification" else out[:, 0]


def compiled_epoch_count(shape: Shape, monitor: tuple[str, bool] | None = None) -> int:
    """How many programs the epoch function of `shape` has compiled (for tests and benchmarks)."""
    return _programs(shape, monitor or default_monitor(shape.task), 10).epoch._cache_size()
