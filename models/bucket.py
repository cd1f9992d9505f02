"""A trial's real architecture (`Shape`) and the static envelope of one compiled program (`Bucket`).

A bucket's program trains every trial whose shape fits inside it: the real widths and depth are
masks, the activation, the optimizer family and batch norm are per-trial selectors. What stays
static, and why:

- input and output sizes, the maximum width of each layer position and the maximum depth: they
  are array shapes;
- the task: it is the loss function;
- the minibatch size: it sets the number of steps of an epoch and the shape of every minibatch;
- the smallest depth: the output layer reads from the positions where some trial may end
  (from `min_depth` on), so a bucket of one depth selects nothing;
- which activations and optimizer families the program computes, and whether it computes batch
  norm and draws dropout masks: a trial selects among them at run time, so each one present costs
  every trial of the bucket its elementwise work; absent ones cost nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from caviar.models.data import Task
from caviar.models.mlp import ACTIVATIONS, MLP, count_parameters
from caviar.models.optim import OPTIMIZERS

SHAPE_DEFAULTS: dict[str, Any] = {
    "hidden_layers": 2,
    "hidden_units": 128,
    "activation": "relu",
    "batch_norm": False,
    "optimizer": "adam",
    "batch_size": 128,
}
"""The architecture and layout hyperparameters a trial takes when it neither searches nor fixes
them; with `program.HPARAM_DEFAULTS`, every default of the engine."""


@dataclass(frozen=True)
class Shape:
    """One trial's real architecture and training layout (what its model file records)."""

    input_dim: int
    num_outputs: int
    hidden: tuple[int, ...]
    activation: str = SHAPE_DEFAULTS["activation"]
    batch_norm: bool = SHAPE_DEFAULTS["batch_norm"]
    optimizer: str = SHAPE_DEFAULTS["optimizer"]
    batch_size: int = SHAPE_DEFAULTS["batch_size"]
    task: Task = "classification"
    use_dropout: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected one of {tuple(ACTIVATIONS)}"
            )
        if self.task not in ("classification", "regression"):
            raise ValueError(f"unknown task {self.task!r}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden widths must be positive, got {self.hidden}")

    @property
    def model(self) -> MLP:
        """The Flax MLP of this exact shape (what `predict` and model files use)."""
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
class Bucket:
    """The static envelope of one compiled program (see the module docstring)."""

    input_dim: int
    num_outputs: int
    task: Task
    batch_size: int
    widths: tuple[int, ...]  # the largest width of each hidden layer position
    min_depth: int
    activations: tuple[str, ...]
    optimizers: tuple[str, ...]
    batch_norm: bool = False
    dropout: bool = False

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"bucket widths must be positive, got {self.widths}")
        if not 1 <= self.min_depth <= len(self.widths):
            raise ValueError(f"min_depth {self.min_depth} outside 1..{len(self.widths)}")
        if not self.activations or not self.optimizers:
            raise ValueError("a bucket computes at least one activation and one optimizer")

    @classmethod
    def exact(cls, shape: Shape) -> Bucket:
        """The bucket of one shape, with no padding and no selector."""
        return cls(
            input_dim=shape.input_dim,
            num_outputs=shape.num_outputs,
            task=shape.task,
            batch_size=shape.batch_size,
            widths=shape.hidden,
            min_depth=len(shape.hidden),
            activations=(shape.activation,),
            optimizers=(shape.optimizer,),
            batch_norm=shape.batch_norm,
            dropout=shape.use_dropout,
        )

    @classmethod
    def envelope(cls, buckets: Iterable[Bucket | Shape]) -> Bucket:
        """The smallest bucket that every given shape or bucket fits in (same static key)."""
        items = [b if isinstance(b, Bucket) else cls.exact(b) for b in buckets]
        first = items[0]
        if any(b.key != first.key for b in items):
            raise ValueError("shapes of different input/output sizes, task or batch size")
        depth = max(len(b.widths) for b in items)
        return cls(
            *first.key,
            widths=tuple(
                max(b.widths[i] for b in items if i < len(b.widths)) for i in range(depth)
            ),
            min_depth=min(b.min_depth for b in items),
            activations=_ordered(ACTIVATIONS, (a for b in items for a in b.activations)),
            optimizers=_ordered(OPTIMIZERS, (o for b in items for o in b.optimizers)),
            batch_norm=any(b.batch_norm for b in items),
            dropout=any(b.dropout for b in items),
        )

    @property
    def key(self) -> tuple[int, int, Task, int]:
        """What no bucket can pad over: input and output sizes, task, minibatch size."""
        return (self.input_dim, self.num_outputs, self.task, self.batch_size)

    @property
    def out_width(self) -> int:
        """Rows of the output kernel: the widest position where a trial of the bucket may end."""
        return max(self.widths[self.min_depth - 1 :])

    def fits(self, other: Bucket | Shape) -> bool:
        """Whether every trial of `other` (a shape or a bucket) can train in this bucket."""
        return Bucket.envelope([self, other]) == self if self.key == _key(other) else False

    def forward_flops(self, examples: int) -> int:
        """Multiply-adds ×2 of one padded forward pass over `examples` rows (matmuls only)."""
        layers = itertools.pairwise((self.input_dim, *self.widths))
        hidden = sum(a * b for a, b in layers)
        return 2 * examples * (hidden + self.out_width * self.num_outputs)

    def describe(self) -> str:
        """A short readable form, e.g. `40→≤256→≤128→10 d1-2 relu momentum,adam bn`."""
        depth = (
            f"d{self.min_depth}"
            if self.min_depth == len(self.widths)
            else f"d{self.min_depth}-{len(self.widths)}"
        )
        parts = [
            "→".join(map(str, (self.input_dim, *self.widths, self.num_outputs))),
            depth,
            ",".join(self.activations),
            ",".join(self.optimizers),
        ]
        parts += ["bn"] * self.batch_norm + ["dropout"] * self.dropout
        return " ".join(parts)


def epoch_flops(item: Bucket | Shape, train_examples: int, dev_examples: int) -> int:
    """FLOPs of one trial-epoch: 3× forward per training example in full minibatches (forward and
    backward), 1× per dev example."""
    trained = train_examples // item.batch_size * item.batch_size
    return 3 * item.forward_flops(trained) + item.forward_flops(dev_examples)


def _key(item: Bucket | Shape) -> tuple:
    return (item.input_dim, item.num_outputs, item.task, item.batch_size)


def _ordered(order: Iterable[str], names: Iterable[str]) -> tuple[str, ...]:
    present = set(names)
    return tuple(name for name in order if name in present)
