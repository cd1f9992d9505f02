"""The search driver's decision core: what a search does next, from where it stands.

A search runs its stages one after the other (coarse to fine). Whoever drives it, `caviar run`
in its own process or `caviar worker` under the search's row lock, reads where the search stands
into a `SearchState`, asks `decide` what to do, and carries the decision out:

- `Ask(n)`: ask Optuna for n trials of the open stage and train them;
- `Open(k)`: open stage k (narrowed around the best trials of stage k - 1), then decide again;
- `Wait()`: trials of the open stage are in flight elsewhere: come back later;
- `Finish()`: test the best trial once and close the search;
- `Cancel()`: close the search as cancelled.

Nothing here does I/O, so every path through a search is testable without a database or a
process. The rest of the policy both drivers share lives here too: why trials in flight stop,
when a search is out of time, how many trials to ask for after running out of memory, and which
trained trial the final fit can test without a refit.

    >>> decide(SearchState(plan=(4, 2), stage=1, used=3), capacity=8)
    Ask(count=1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

#: Why trials in flight stop, for the search's own reasons (a process stopping has its own).
CANCELLED = "cancelled"
TIMEOUT = "timeout"


@dataclass(frozen=True)
class SearchState:
    """Where a search stands, as far as its next step depends on it."""

    plan: tuple[int, ...]  #: trials of each stage, in order
    stage: int = 0  #: the open stage (from 1); 0 before the first one opens
    used: int = 0  #: trial slots of the open stage spent (finished) or held (running)
    running: int = 0  #: trials of the open stage in training now
    timed_out: bool = False  #: the search's time is up: no trial starts any more
    cancel_requested: bool = False
    #: With a trial-epoch budget: the epochs it has left, counting each running trial at
    #: `epochs_per_trial` (a trial starts only while that many still fit); None: no such budget.
    epochs_left: int | None = None
    epochs_per_trial: int = 1

    def __post_init__(self) -> None:
        if not self.plan or min(self.plan) < 1:
            raise ValueError(f"every stage needs at least one trial, got {self.plan}")
        if not 0 <= self.stage <= len(self.plan):
            raise ValueError(f"stage {self.stage} is not one of the plan's {len(self.plan)}")
        if self.stage == 0 and (self.used or self.running):
            raise ValueError("no trial can run before the first stage opens")
        if self.epochs_per_trial < 1:
            raise ValueError(f"a trial trains at least one epoch, got {self.epochs_per_trial}")


@dataclass(frozen=True)
class Ask:
    """Ask for `count` trials of the open stage and train them."""

    count: int


@dataclass(frozen=True)
class Open:
    """Open stage `stage`, then decide again."""

    stage: int


@dataclass(frozen=True)
class Wait:
    """The open stage's last trials train elsewhere: nothing to do here until they end."""


@dataclass(frozen=True)
class Finish:
    """Test the best trial once and close the search."""


@dataclass(frozen=True)
class Cancel:
    """Close the search as cancelled."""


Decision = Ask | Open | Wait | Finish | Cancel


def decide(state: SearchState, capacity: int) -> Decision:
    """The search's next step, for a driver that can train `capacity` trials at once.

    A stage ends when its budget (trials, or trial-epochs) is spent and none of its trials trains
    any more; out of time, no trial starts and no stage opens, and the search finishes once its
    running trials end.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    if state.cancel_requested:
        return Cancel()
    if state.stage == 0:
        return Open(1)
    free = state.plan[state.stage - 1] - state.used
    if state.epochs_left is not None:
        free = min(free, state.epochs_left // state.epochs_per_trial)
    if free > 0 and not state.timed_out:
        return Ask(min(capacity, free))
    if state.running:
        return Wait()
    if state.stage < len(state.plan) and not state.timed_out:
        return Open(state.stage + 1)
    return Finish()


def stop_reason(*, cancel_requested: bool, timed_out: bool) -> str | None:
    """Why the search's trials in flight stop now (`CANCELLED`, `TIMEOUT`), or None."""
    if cancel_requested:
        return CANCELLED
    return TIMEOUT if timed_out else None


def out_of_time(started_at: datetime | None, timeout_s: float | None, now: datetime) -> bool:
    """Whether a search started at `started_at` has used up its `timeout_s` by `now`."""
    if not timeout_s or started_at is None:
        return False
    return (now - started_at).total_seconds() > timeout_s


#: Batches in a row without running out of memory before a halved batch doubles again.
REGROW_AFTER = 4


@dataclass
class Capacity:
    """How many trials a driver trains at once: `limit`, halved (down to 1) after trials ran out
    of memory, and doubled back toward `limit` after `REGROW_AFTER` batches in a row that did
    not (what ran out may have been another process's, or a larger bucket's)."""

    limit: int
    current: int = 0
    clean: int = 0  # batches in a row without running out of memory

    def __post_init__(self) -> None:
        self.current = self.current or self.limit

    def after(self, reasons: Iterable[str | None]) -> int:
        """The capacity after a batch whose trials ended for `reasons`."""
        if "oom" in set(reasons):
            self.current, self.clean = max(1, self.current // 2), 0
        elif self.current < self.limit:
            self.clean += 1
            if self.clean >= REGROW_AFTER:
                self.current, self.clean = min(self.limit, 2 * self.current), 0
        return self.current


if TYPE_CHECKING:
    from caviar.search.spec import Direction


class Trained(Protocol):
    """A trial this process trained: its dev value (None unless complete) and, if it still
    holds them, its best epoch's weights."""

    @property
    def value(self) -> float | None: ...

    @property
    def variables(self) -> Callable[[], dict] | None: ...


T = TypeVar("T", bound=Trained)


def best_trained(best: T | None, outcomes: Iterable[T], direction: Direction) -> T | None:
    """The best of `best` and `outcomes` among trials whose weights this process holds.

    The final fit tests that trial's own weights when it is the search's best, instead of
    training it again (`search.final.final_fit`).
    """
    held = [o for o in (best, *outcomes) if o is not None and o.value is not None and o.variables]
    if not held:
        return None
    pick = max if direction == "maximize" else min
    return pick(held, key=lambda o: cast(float, o.value))  # `held` has values only
