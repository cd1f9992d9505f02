"""The search driver's decision core, without a database or a process: every path through a
search, played decision by decision."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from caviar.search.driver import (
    REGROW_AFTER,
    Ask,
    Cancel,
    Capacity,
    Finish,
    Open,
    SearchState,
    Wait,
    best_trained,
    decide,
    out_of_time,
    stop_reason,
)


def play(plan: tuple[int, ...], capacity: int, fail_every: int = 0) -> list:
    """Drive a search to its end as one driver would, training each asked batch at once; every
    `fail_every`-th trial fails for a reason of its worker's (its slot is given back)."""
    state, decisions, trained = SearchState(plan), [], 0
    while not isinstance(decision := decide(state, capacity), Finish):
        decisions.append(decision)
        assert len(decisions) < 1000, decisions[-10:]
        if isinstance(decision, Open):
            state = replace(state, stage=decision.stage, used=0)
        elif isinstance(decision, Ask):
            assert state.used + decision.count <= plan[state.stage - 1]  # never over budget
            trained += decision.count
            given_back = sum(
                1
                for n in range(trained - decision.count, trained)
                if fail_every and n % fail_every == fail_every - 1
            )
            state = replace(state, used=state.used + decision.count - given_back)
        else:
            raise AssertionError(f"nothing else to wait for: {decision}")
    return decisions


def test_a_search_asks_exactly_each_stages_budget_in_batches_then_finishes():
    assert play((4, 2), capacity=3) == [Open(1), Ask(3), Ask(1), Open(2), Ask(2)]


@pytest.mark.parametrize("seed", range(20))
def test_any_plan_and_capacity_spend_exactly_the_budget(seed):
    rng = random.Random(seed)
    plan = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 4)))
    fail_every = rng.choice([0, 3, 4])
    decisions = play(plan, capacity=rng.randint(1, 5), fail_every=fail_every)
    assert [d.stage for d in decisions if isinstance(d, Open)] == list(range(1, len(plan) + 1))
    asked = sum(d.count for d in decisions if isinstance(d, Ask))
    assert asked == sum(plan) if not fail_every else asked >= sum(plan)


def test_a_failed_trials_slot_is_asked_for_again():
    state = SearchState((4,), stage=1, used=3, running=0)  # one of four was preempted
    assert decide(state, capacity=8) == Ask(1)


def test_a_spent_stage_waits_for_trials_in_flight_elsewhere_then_opens_the_next():
    spent = SearchState((4, 2), stage=1, used=4, running=2)
    assert decide(spent, capacity=8) == Wait()
    assert decide(replace(spent, running=0), capacity=8) == Open(2)
    assert decide(SearchState((4, 2), stage=2, used=2), capacity=8) == Finish()


def test_out_of_time_no_trial_starts_and_no_stage_opens():
    late = SearchState((4, 2), stage=1, used=1, running=1, timed_out=True)
    assert decide(late, capacity=8) == Wait()  # its running trials stop at their next epoch
    assert decide(replace(late, running=0), capacity=8) == Finish()


def test_a_cancel_overrides_everything():
    for state in (SearchState((4,)), SearchState((4,), stage=1, used=2, running=2)):
        assert decide(replace(state, cancel_requested=True), capacity=1) == Cancel()


@pytest.mark.parametrize(
    "state",
    [
        {"plan": ()},
        {"plan": (4, 0)},
        {"plan": (4,), "stage": 2},
        {"plan": (4,), "stage": 0, "used": 1},
    ],
)
def test_impossible_states_are_refused_when_built(state):
    with pytest.raises(ValueError):
        SearchState(**state)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        decide(SearchState((4,)), capacity=0)


def test_trials_in_flight_stop_for_a_cancel_first_then_for_time():
    assert stop_reason(cancel_requested=True, timed_out=True) == "cancelled"
    assert stop_reason(cancel_requested=False, timed_out=True) == "timeout"
    assert stop_reason(cancel_requested=False, timed_out=False) is None


def test_time_runs_out_after_timeout_s_from_the_start():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert not out_of_time(start, 10, start + timedelta(seconds=10))
    assert out_of_time(start, 10, start + timedelta(seconds=10.5))
    assert not out_of_time(start, None, start + timedelta(days=9))
    assert not out_of_time(None, 10, start)  # not started yet


def test_running_out_of_memory_halves_the_batch_down_to_one():
    capacity = Capacity(4)
    assert capacity.after(["oom", None, "oom"]) == 2
    assert capacity.after(["oom"]) == 1 and capacity.after(["oom"]) == 1
    assert Capacity(32).after([None, "diverged", "preempted"]) == 32


def test_a_halved_batch_doubles_back_after_batches_without_running_out_of_memory():
    capacity = Capacity(32)
    capacity.after(["oom"])
    capacity.after(["oom"])
    assert capacity.current == 8
    for _ in range(REGROW_AFTER - 1):
        assert capacity.after([None, "pruned"]) == 8
    assert capacity.after([None]) == 16  # the REGROW_AFTER-th batch in a row
    for _ in range(REGROW_AFTER - 1):
        capacity.after([None])
    assert capacity.after(["oom"]) == 8  # a run of clean batches starts over after one
    for _ in range(3 * REGROW_AFTER):
        capacity.after([None])
    assert capacity.current == 32  # never above the limit


@dataclass(frozen=True)
class Outcome:
    value: float | None
    weights: bool = True

    @property
    def variables(self):
        return (lambda: {"w": self.value}) if self.weights else None


def test_the_final_fit_reuses_the_best_trial_whose_weights_are_in_hand():
    first = [Outcome(0.7), Outcome(None), Outcome(0.9, weights=False)]
    best = best_trained(None, first, "maximize")
    assert best == Outcome(0.7)  # 0.9 has no weights here; a pruned trial has no value
    assert best_trained(best, [Outcome(0.8)], "maximize") == Outcome(0.8)
    assert best_trained(best, [Outcome(0.6)], "minimize") == Outcome(0.6)
    assert best_trained(None, [Outcome(None)], "maximize") is None


def test_a_trial_epoch_budget_starts_a_trial_only_while_a_whole_one_fits():
    state = SearchState(plan=(40,), stage=1, used=3, running=1, epochs_left=25, epochs_per_trial=9)
    assert decide(state, capacity=8) == Ask(2)  # 25 epochs left: two trials of 9 fit, not three
    assert decide(replace(state, epochs_left=8), capacity=8) == Wait()  # the running one ends
    spent = replace(state, epochs_left=8, running=0)
    assert decide(spent, capacity=8) == Finish()
    with pytest.raises(ValueError, match="at least one epoch"):
        SearchState(plan=(4,), epochs_per_trial=0)
