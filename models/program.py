"""The maths of one bucket's program: pure functions of one trial's arrays.

`train_epoch` and `evaluate` take a static `Bucket` and one trial's arrays (no trial axis);
`models.train` vmaps them over the trial axis and jit-compiles them per bucket. `init_trial`
builds a trial's first state on the host.

A trial's arrays (`TrialArrays`, from `trial_arrays`) hold its real architecture as traced
values (widths per position, 0 past its depth; depth; activation, optimizer and batch-norm
selectors) next to its continuous hyperparameters. Padding is exact: padded units start at zero
(kernels, biases, batch-norm scales, shifts and statistics), their activations are masked to zero
whatever the activation, so their gradients, moments and L2 terms are zero and they stay zero;
layers past a trial's depth have no parameters and the output layer reads the trial's last real
layer; initial weights are drawn in the real shape (scaled by the real fans) and then padded;
dropout masks are drawn unit-major, so the real units draw what they would alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax  # type: ignore[import-untyped]  # optax ships no py.typed marker

from caviar.models.bucket import Bucket, Shape
from caviar.models.data import Task
from caviar.models.mlp import ACTIVATIONS, INITS, init_std, inverted_dropout
from caviar.models.optim import (
    LR_DECAYS,
    OPTIMIZERS,
    Hyper,
    Moments,
    init_moments,
    lr_factor,
    update,
)

#: Dev examples evaluated at once: a larger dev set is evaluated chunk by chunk, so what an
#: epoch program holds for it is `slots × DEV_CHUNK × width`, not the whole set's activations.
DEV_CHUNK = 4096

#: Batch norm as the Flax MLP has it: running averages with momentum 0.9, ε 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

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

#: One trial's arrays: HPARAM_DEFAULTS' names plus `widths`, `depth`, `activation`,
#: `optimizer` and `batch_norm`.
TrialArrays = dict[str, jax.Array]
Params = dict[str, tuple[jax.Array | np.ndarray, ...]]  # NumPy on the host (init_trial, read_slot)


class TrialState(NamedTuple):
    """Everything a trial carries from epoch to epoch (with a trial axis in `models.train`)."""

    params: Params  # kernel, bias (hidden layers, then output); scale, shift (batch norm)
    stats: Params  # batch-norm running mean and var, per hidden layer ({} without batch norm)
    moments: Moments
    best_params: Params
    best_stats: Params
    best_score: jax.Array | np.ndarray | np.float32
    best_epoch: jax.Array | np.ndarray | np.int32  # 0 until an epoch has a finite score


def trial_arrays(
    bucket: Bucket, shapes: Sequence[Shape], hparams: Sequence[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
    """Stack K trials' architectures and hyperparameters on a leading trial axis for `bucket`.

    Missing hyperparameters take `HPARAM_DEFAULTS`; names become integer codes. Raises
    ValueError for a shape that does not fit the bucket or an unknown name.
    """
    columns: dict[str, list] = {name: [] for name in HPARAM_DEFAULTS}
    for trial in hparams:
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
    for shape in shapes:
        if not bucket.fits(shape):
            raise ValueError(f"shape {shape} does not fit bucket {bucket.describe()}")
    depth = len(bucket.widths)
    stacked["widths"] = np.asarray(
        [list(s.hidden) + [0] * (depth - len(s.hidden)) for s in shapes], np.int32
    )
    stacked["depth"] = np.asarray([len(s.hidden) for s in shapes], np.int32)
    stacked["activation"] = np.asarray(
        [list(ACTIVATIONS).index(s.activation) for s in shapes], np.int32
    )
    stacked["optimizer"] = np.asarray([OPTIMIZERS.index(s.optimizer) for s in shapes], np.int32)
    stacked["batch_norm"] = np.asarray([s.batch_norm for s in shapes])
    return stacked


def _code(names: tuple[str, ...], value: Any, what: str) -> int:
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; expected one of {names}")
    return names.index(value)


def unit_masks(bucket: Bucket, hp: TrialArrays) -> list[jax.Array]:
    """Per hidden position, 1.0 on the trial's real units and 0.0 on padding."""
    return [
        (jnp.arange(width) < hp["widths"][position]).astype(jnp.float32)
        for position, width in enumerate(bucket.widths)
    ]


def init_trial(bucket: Bucket, shape: Shape, hparams: Mapping[str, Any]) -> TrialState:
    """A trial's fresh state in `bucket` (NumPy, no trial axis): kernels ~ N(0, init_std²) over
    its real units, biases and shifts zero, batch-norm scales and running variances one on real
    units, everything else zero.

    Drawn on the host in the trial's real shape (one generator per layer) and then padded, so the
    bucket cannot change a draw, and no program is compiled for it.
    """
    seed = int(hparams.get("seed", HPARAM_DEFAULTS["seed"]))
    code = _code(INITS, hparams.get("init", HPARAM_DEFAULTS["init"]), "init")
    fans = (shape.input_dim, *shape.hidden, shape.num_outputs)
    rows = (bucket.input_dim, *bucket.widths)
    kernels, biases = [], []
    for position, width in enumerate((*bucket.widths, bucket.num_outputs)):
        output = position == len(bucket.widths)
        layer = len(shape.hidden) if output else position
        kernel = np.zeros((bucket.out_width if output else rows[position], width), np.float32)
        if output or position < len(shape.hidden):
            fan_in, fan_out = fans[layer], fans[layer + 1]
            draw = np.random.default_rng([seed, layer]).standard_normal((fan_in, fan_out))
            kernel[:fan_in, :fan_out] = draw * init_std(code, fan_in, fan_out)
        kernels.append(kernel)
        biases.append(np.zeros(width, np.float32))
    params: Params = {"kernel": tuple(kernels), "bias": tuple(biases)}
    stats: Params = {}
    if bucket.batch_norm:
        real = [np.zeros(width, np.float32) for width in bucket.widths]
        for position, width in enumerate(shape.hidden):
            real[position][:width] = 1.0
        params["scale"] = tuple(m * shape.batch_norm for m in real)
        params["shift"] = tuple(np.zeros_like(m) for m in real)
        stats = {"mean": tuple(np.zeros_like(m) for m in real), "var": tuple(real)}
    score = np.float32(-np.inf)
    return TrialState(params, stats, init_moments(params), params, stats, score, np.int32(0))


def forward(
    bucket: Bucket,
    params: Params,
    stats: Params,
    hp: TrialArrays,
    x: jax.Array,
    *,
    train: bool,
    key: jax.Array | None = None,
) -> tuple[jax.Array, Params]:
    """The trial's outputs on `x` [n, input_dim] and its batch-norm statistics after it.

    Training mode normalises with the batch's statistics (and updates the running ones) and
    applies inverted dropout with `key`; eval mode uses the running statistics and no dropout.
    """
    masks = unit_masks(bucket, hp)
    activations = [ACTIVATIONS[name] for name in bucket.activations]
    codes = [list(ACTIVATIONS).index(name) for name in bucket.activations]
    means, variances = [], []
    last = None
    a = x
    for position, mask in enumerate(masks):
        z = a @ params["kernel"][position]
        plain = z + params["bias"][position]
        if bucket.batch_norm:
            if train:
                mean: jax.Array | np.ndarray = z.mean(0)
                var: jax.Array | np.ndarray = jnp.maximum(0.0, jnp.mean(z * z, 0) - mean * mean)
                on = hp["batch_norm"]
                means.append(
                    jnp.where(
                        on,
                        BN_MOMENTUM * stats["mean"][position] + (1 - BN_MOMENTUM) * mean,
                        stats["mean"][position],
                    )
                )
                variances.append(
                    jnp.where(
                        on,
                        BN_MOMENTUM * stats["var"][position] + (1 - BN_MOMENTUM) * var,
                        stats["var"][position],
                    )
                )
            else:
                mean, var = stats["mean"][position], stats["var"][position]
            mul = jax.lax.rsqrt(var + BN_EPSILON) * params["scale"][position]
            normalised = (z - mean) * mul + params["shift"][position]
            z = jnp.where(hp["batch_norm"], normalised, plain)
        else:
            z = plain
        a = activations[0](z)
        for code, g in zip(codes[1:], activations[1:], strict=True):
            a = jnp.where(hp["activation"] == code, g(z), a)
        a = a * mask
        if bucket.dropout and train:
            assert key is not None  # training with dropout needs `key`
            a = inverted_dropout(a, hp["dropout"], jax.random.fold_in(key, position))
        if position + 1 >= bucket.min_depth:
            padded = jnp.pad(a, ((0, 0), (0, bucket.out_width - a.shape[1])))
            last = padded if last is None else jnp.where(hp["depth"] == position + 1, padded, last)
    assert last is not None  # min_depth >= 1, so some position set it
    out = last @ params["kernel"][-1] + params["bias"][-1]
    new_stats: Params = {"mean": tuple(means), "var": tuple(variances)} if means else stats
    return out, new_stats


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


def sum_squared_kernels(params: Params) -> jax.Array:
    """Σ_l ‖W[l]‖²_F over kernels only, never biases or batch-norm scales (padding adds zero)."""
    # A jax.Array, not sum()'s start 0: there is always an output kernel.
    return cast(jax.Array, sum(jnp.sum(jnp.square(kernel)) for kernel in params["kernel"]))


def cost(
    bucket: Bucket,
    params: Params,
    stats: Params,
    hp: TrialArrays,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    target_std: jax.Array | float = 1.0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, Params]]:
    """The minibatch cost the engine differentiates: data loss + (λ/2m)·Σ‖W‖² (0 for adamw,
    whose decay is decoupled). Returns (cost, (data loss, metric, new batch-norm statistics))."""
    out, new_stats = forward(bucket, params, stats, hp, x, train=True, key=key)
    loss, metric = data_loss(bucket.task, out, y, target_std)
    adamw = hp["optimizer"] == OPTIMIZERS.index("adamw")
    l2_coef = jnp.where(adamw, 0.0, hp["l2"] / (2.0 * bucket.batch_size))
    return loss + l2_coef * sum_squared_kernels(params), (loss, metric, new_stats)


def evaluate(
    bucket: Bucket,
    params: Params,
    stats: Params,
    hp: TrialArrays,
    x: jax.Array,
    y: jax.Array,
    target_std: jax.Array | float = 1.0,
    chunk: int = DEV_CHUNK,
) -> dict[str, jax.Array]:
    """Dev metrics in eval mode: `dev_loss` and `dev_accuracy`, or `dev_mse` and `dev_r2`.

    The outputs are computed `chunk` examples at a time (each example's output does not depend
    on the others' in eval mode), then the metrics over all of them.
    """
    rows = x.shape[0]
    if rows <= chunk:
        out, _ = forward(bucket, params, stats, hp, x, train=False)
    else:
        chunks = -(-rows // chunk)
        padded = jnp.pad(x, ((0, chunks * chunk - rows), (0, 0))).reshape(chunks, chunk, -1)
        outs = jax.lax.map(
            lambda part: forward(bucket, params, stats, hp, part, train=False)[0], padded
        )
        out = outs.reshape(chunks * chunk, -1)[:rows]
    return {
        f"dev_{name}": value
        for name, value in output_metrics(bucket.task, out, y, target_std).items()
    }


def output_metrics(
    task: Task, out: jax.Array, y: jax.Array, target_std: jax.Array | float = 1.0
) -> dict[str, jax.Array]:
    """`loss` and `accuracy` (classification) or `loss`, `mse` and `r2` of outputs on (x, y)."""
    loss, metric = data_loss(task, out, y, target_std)
    if task == "classification":
        return {"loss": loss, "accuracy": metric}
    r2 = 1.0 - jnp.sum(jnp.square(out[:, 0] - y)) / jnp.sum(jnp.square(y - y.mean()))
    return {"loss": loss, "mse": metric, "r2": r2}


def train_epoch(
    bucket: Bucket,
    monitor: tuple[str, bool],
    decay_every: int,
    state: TrialState,
    hp: TrialArrays,
    x_train: jax.Array,
    y_train: jax.Array,
    order: jax.Array,
    x_dev: jax.Array,
    y_dev: jax.Array,
    epoch: jax.Array,
    target_std: jax.Array,
) -> tuple[TrialState, dict[str, jax.Array]]:
    """The trial's epoch `epoch` (0-based, its own) over the minibatches `order` [steps, batch]
    (rows of `x_train`, gathered step by step), then the dev metrics.

    The learning rate decays per epoch; `monitor` (metric, maximize) decides whether this epoch
    becomes the trial's best, whose parameters and statistics the state keeps.
    """
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(hp["seed"]), 2), epoch)
    lr = hp["learning_rate"] * lr_factor(hp["lr_decay"], hp["decay_rate"], epoch, decay_every)
    hyper = Hyper(
        family=hp["optimizer"],
        learning_rate=lr,
        momentum=hp["momentum"],
        beta2=hp["beta2"],
        epsilon=hp["epsilon"],
        weight_decay=hp["l2"] / bucket.batch_size,  # adamw: the same decay as (λ/2m)·‖W‖²
    )
    decays = {
        name: tuple(name == "kernel" for _ in leaves) for name, leaves in state.params.items()
    }

    def step(carry, rows):
        params, stats, moments, index = carry
        xb, yb = x_train[rows], y_train[rows]
        grads, (loss, metric, stats) = jax.grad(
            lambda p: cost(
                bucket, p, stats, hp, xb, yb, jax.random.fold_in(key, index), target_std
            ),
            has_aux=True,
        )(params)
        params, moments = update(bucket.optimizers, hyper, grads, moments, params, decays)
        return (params, stats, moments, index + 1), (loss, metric)

    carry = (state.params, state.stats, state.moments, jnp.int32(0))
    (params, stats, moments, _), (losses, train_metric) = jax.lax.scan(step, carry, order)
    metrics = {
        "train_loss": losses.mean(),
        **evaluate(bucket, params, stats, hp, x_dev, y_dev, target_std),
    }
    metrics["train_accuracy" if bucket.task == "classification" else "train_mse"] = (
        train_metric.mean()
    )
    name, maximize = monitor
    score = metrics[name] if maximize else -metrics[name]
    improved = jnp.isfinite(score) & (score > state.best_score)

    def keep(new, old):
        return jax.tree_util.tree_map(lambda n, o: jnp.where(improved, n, o), new, old)

    return TrialState(
        params,
        stats,
        moments,
        keep(params, state.best_params),
        keep(stats, state.best_stats),
        jnp.where(improved, score, state.best_score),
        jnp.where(improved, epoch + 1, state.best_epoch),
    ), metrics


def real_variables(shape: Shape, params: Params, stats: Params) -> dict:
    """The Flax variables of `shape`'s own MLP, cut from one trial's padded arrays (no trial
    axis): what `predict` and the model file use."""
    rows = (shape.input_dim, *shape.hidden)
    layers: dict[str, dict] = {}
    batch_stats: dict[str, dict] = {}
    for position, width in enumerate(shape.hidden):
        kernel = np.asarray(params["kernel"][position])[: rows[position], :width]
        if shape.batch_norm:
            layers[f"Dense_{position}"] = {"kernel": kernel}
            layers[f"BatchNorm_{position}"] = {
                "scale": np.asarray(params["scale"][position])[:width],
                "bias": np.asarray(params["shift"][position])[:width],
            }
            batch_stats[f"BatchNorm_{position}"] = {
                "mean": np.asarray(stats["mean"][position])[:width],
                "var": np.asarray(stats["var"][position])[:width],
            }
        else:
            bias = np.asarray(params["bias"][position])[:width]
            layers[f"Dense_{position}"] = {"kernel": kernel, "bias": bias}
    layers[f"Dense_{len(shape.hidden)}"] = {
        "kernel": np.asarray(params["kernel"][-1])[: shape.hidden[-1]],
        "bias": np.asarray(params["bias"][-1]),
    }
    variables = {"params": layers}
    if shape.batch_norm:
        variables["batch_stats"] = batch_stats
    return variables
