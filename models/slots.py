"""A bucket's slots on the device: fixed groups of trial states that trials move in and out of.

A bucket program trains `groups × group_size` slots, each group one compiled call. Each slot
holds one trial: its state, its hyperparameter row and its own epoch counter, so a trial that
starts in a slot freed by another trains as it would alone (its learning-rate decay, dropout
keys and data order follow its own epochs). A new occupant is written into its slot on the
device, in place; the other slots are not copied anywhere. A slot whose trial left and that no
trial took runs on as padding (its results are ignored); a group with no trial left is not run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from caviar.models.placement import Placement
from caviar.models.program import TrialState

#: Marks a slot with no trial.
EMPTY = -1


@dataclass
class Group:
    """`group_size` slots trained by one compiled call."""

    state: TrialState  # on the device, with a leading slot axis
    hparams: dict[str, jax.Array]  # the occupants' rows of `trial_arrays`, on the device
    occupants: np.ndarray  # int [group_size]: the trial in each slot, or EMPTY
    epochs: np.ndarray  # int [group_size]: epochs dispatched for its occupant
    round: int = 0  # the last round dispatched
    previous: TrialState | None = None  # the state before that round, when it was not donated

    @property
    def live(self) -> np.ndarray:
        return self.occupants != EMPTY

    def state_after(self, round_: int) -> TrialState:
        """The slots' state as round `round_` left it: the one before the last round dispatched
        when that one came later (dispatched ahead), else the latest."""
        if self.round > round_:
            assert self.previous is not None  # rounds are dispatched ahead only undonated
            return self.previous
        return self.state


def build_groups(
    placement: Placement,
    group_size: int,
    trials: Sequence[int],
    states: Callable[[int], TrialState],
    rows: Callable[[int], dict[str, np.ndarray]],
    epochs: Callable[[int], int] = lambda _: 0,
) -> list[Group]:
    """Groups holding `trials` in order; a short last group's spare slots repeat its trials
    (as padding: their slots are empty)."""
    groups = []
    for start in range(0, len(trials), group_size):
        members = list(trials[start : start + group_size])
        filled = np.resize(np.asarray(members), group_size)
        occupants = np.full(group_size, EMPTY)
        occupants[: len(members)] = members
        groups.append(
            Group(
                placement.shard(_stack([states(int(i)) for i in filled])),
                placement.shard(_stack([rows(int(i)) for i in filled])),
                occupants,
                np.asarray([epochs(int(i)) if i != EMPTY else 0 for i in occupants]),
            )
        )
    return groups


def write_slot(
    placement: Placement,
    group: Group,
    slot: int | np.integer,
    trial: int,
    state: TrialState,
    row: dict[str, np.ndarray],
) -> None:
    """Put `trial` (its fresh host `state` and hyperparameter `row`) into `slot`, on the device."""
    group.state, group.hparams = _write_row((group.state, group.hparams), slot, (state, row))
    if placement.trials is not None:
        group.state, group.hparams = placement.shard((group.state, group.hparams))
    group.occupants[slot], group.epochs[slot] = trial, 0


def read_slot(group: Group, slot: int | np.integer, round_: int) -> TrialState:
    """The state of `slot`'s trial as round `round_` left it, on the host (one slot's arrays).

    Where the slots live in host memory (the CPU), the slot's rows are copied out of views of
    the arrays, with no program to compile or run (for MNIST-1D's 40→494→494→494→10 in groups
    of 4: 1.1 ms a read against 23 ms, and no 0.2 s compile per bucket); on an accelerator a
    small program gathers them there and only they are transferred.
    """
    state = group.state_after(round_)
    if _in_host_memory(state):
        return jax.tree_util.tree_map(lambda a: _host_row(a, int(slot)), state)
    return jax.device_get(_read_row(state, slot))


def read_groups(groups: Sequence[Group]) -> dict[int, TrialState]:
    """Every live trial's state on the host, by trial (one transfer per group)."""
    found: dict[int, TrialState] = {}
    for group, state in zip(groups, jax.device_get([g.state for g in groups]), strict=True):
        for slot in np.flatnonzero(group.live):
            found[int(group.occupants[slot])] = jax.tree_util.tree_map(
                lambda a, r=slot: a[r], state
            )
    return found


def warm_slot_programs(
    placement: Placement, group: Group, state: TrialState, row: dict[str, np.ndarray]
) -> None:
    """Compile the programs that write one slot of groups shaped like `group` and, on an
    accelerator, read one back (each a fraction of a second per bucket), by writing `state`
    and `row` into its first slot and reading it back: a compile ahead of the bucket
    (`models.train.compile_ahead`) does this so that the first trial to join or leave it does
    not wait for them. `group` is consumed."""
    slot = np.int64(0)  # the type `np.flatnonzero` gives the slots of trials joining or leaving
    write_slot(placement, group, slot, int(group.occupants[0]), state, row)
    read_slot(group, slot, group.round)


@functools.partial(jax.jit, donate_argnums=0)
def _write_row(tree, slot, new):
    return jax.tree_util.tree_map(lambda a, n: a.at[slot].set(n), tree, new)


@jax.jit
def _read_row(tree, slot):
    return jax.tree_util.tree_map(lambda a: a[slot], tree)


def _in_host_memory(tree) -> bool:
    """Whether every array of `tree` lives on CPU devices (in this process's own memory)."""
    return all(
        device.platform == "cpu"
        for leaf in jax.tree_util.tree_leaves(tree)
        for device in leaf.devices()
    )


def _host_row(array: jax.Array, row: int) -> np.ndarray:
    """A copy of `array[row]` (`array` in host memory), read through a view of the shard that
    holds the row: the view is dropped at once, so the next round may still donate the array."""
    for shard in array.addressable_shards:
        rows = range(array.shape[0])[shard.index[0]]
        if row in rows:
            return np.array(np.from_dlpack(shard.data)[row - rows.start])
    raise IndexError(f"row {row} is in no addressable shard of an array of {array.shape[0]}")


def _stack(trees: list):
    """Stack host pytrees on a new leading slot axis."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *trees)
