"""Split a claim of trials into buckets so as to minimise the estimated wall time.

`plan` is a pure function of the trials' shapes, the measured costs, the buckets already
compiled in this process and those whose program is in the persistent compilation cache. A
bucket costs the time to have its program (zero when compiled already, the measured load time
when cached, else the measured compile time) plus its trials' padded FLOPs at the measured rate,
in the groups the engine would train them in (`Costs.slots`). Strategies:

- `auto` (default): start from one bucket per shape and repeatedly make the merge (or the move
  into an already compiled or cached bucket) that saves the most estimated time, until none
  saves any;
- `exact`: one bucket per shape, no padding (one program per shape);
- `single`: one bucket for every trial that can share one (same input and output sizes, task and
  minibatch size), or an already compiled or cached bucket that holds them all.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from caviar.models.bucket import Bucket, Shape, epoch_flops

STRATEGIES: tuple[str, ...] = ("auto", "exact", "single")

#: Environment variable that chooses the strategy of workers and `caviar run`.
STRATEGY_ENV = "CAVIAR_BUCKETS"


def strategy_from_env() -> str:
    """`$CAVIAR_BUCKETS`, or `auto`; raises ValueError for an unknown strategy."""
    value = os.environ.get(STRATEGY_ENV) or "auto"
    if value not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV}={value!r}: expected one of {', '.join(STRATEGIES)}")
    return value


@dataclass(frozen=True)
class Costs:
    """What the estimate of a bucket's wall time needs: measured rates and the batch's size."""

    compile_s: float  # one new program
    load_s: float  # one program read from the persistent compilation cache
    flops_per_s: float  # padded training FLOPs per second
    epochs: float  # a trial's epochs on average (fewer than the most where it is pruned)
    train_examples: int
    dev_examples: int
    group_size: int  # trials per compiled call at most
    devices: int = 1  # the devices a group's trials are split across (`models.placement`)

    def trial_flops(self, item: Bucket | Shape) -> float:
        """FLOPs of one trial over every epoch, in `item`'s shape."""
        return self.epochs * epoch_flops(item, self.train_examples, self.dev_examples)

    def slots(self, trials: int) -> float:
        """What `trials` trials of one bucket cost in trial-slots, laid out as the engine lays
        them (`models.train.train_batch`): groups of `group_size` or fewer (a bucket of fewer
        trials trains them in one group of their number), each a whole multiple of the devices
        it uses; with fewer trials than devices, the idle devices' share is lost."""
        used = max(1, min(self.devices, trials))
        size = -(-min(self.group_size, trials) // used) * used
        return math.ceil(trials / size) * size * self.devices / used

    def seconds(self, bucket: Bucket, trials: int, build_s: float) -> float:
        """Estimated wall time of `trials` trials in `bucket` whose program takes `build_s` to
        have (0 for no trials)."""
        if trials == 0:
            return 0.0
        return build_s + self.slots(trials) * self.trial_flops(bucket) / self.flops_per_s


@dataclass(frozen=True)
class Assignment:
    """One bucket of a plan and the indices of the trials it trains."""

    bucket: Bucket
    members: tuple[int, ...]
    compiled: bool  # its program exists in this process already
    cached: bool  # its program is in the persistent compilation cache (and not compiled)
    seconds: float  # the estimate

    @property
    def program(self) -> str:
        """Where its program comes from: `compiled`, `cached` or `new`."""
        return "compiled" if self.compiled else "cached" if self.cached else "new"


@dataclass(frozen=True)
class Plan:
    """The buckets chosen for a claim, with the estimate and the padding waste."""

    assignments: tuple[Assignment, ...]
    real_flops: float
    padded_flops: float

    @property
    def waste(self) -> float:
        """Padded FLOPs ÷ real FLOPs of the claim's trials (1.0: no padding)."""
        return self.padded_flops / self.real_flops if self.real_flops else 1.0

    @property
    def seconds(self) -> float:
        return sum(a.seconds for a in self.assignments)

    def describe(self) -> str:
        """One line per bucket: trials, whether compiled, estimate, and the bucket."""
        lines = [
            f"{len(a.members)} trials in {a.bucket.describe()} ({a.program}, ~{a.seconds:.1f} s)"
            for a in self.assignments
        ]
        return "; ".join(lines) + f"; padding waste {self.waste:.2f}×"


def plan(
    shapes: Sequence[Shape],
    costs: Costs,
    *,
    strategy: str = "auto",
    compiled: Iterable[Bucket] = (),
    cached: Iterable[Bucket] = (),
) -> Plan:
    """The buckets for trials of `shapes` under `strategy` (see the module docstring);
    `compiled` buckets have their program in this process, `cached` ones in the persistent
    compilation cache."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    compiled = frozenset(compiled)
    ready = {b: costs.load_s for b in cached} | {b: 0.0 for b in compiled}
    clusters: list[tuple[Bucket, list[int]]] = []
    by_key: dict[tuple, list[int]] = {}
    for index, shape in enumerate(shapes):
        by_key.setdefault(Bucket.exact(shape).key, []).append(index)
    for members in by_key.values():
        if strategy == "single":
            clusters.append((_single(shapes, members, ready, costs), members))
        else:
            exact: dict[Bucket, list[int]] = {}
            for index in members:
                exact.setdefault(Bucket.exact(shapes[index]), []).append(index)
            found = list(exact.items())
            clusters += _merge(found, ready, costs) if strategy == "auto" else found
    assignments = tuple(
        Assignment(
            b,
            tuple(m),
            b in compiled,
            b in ready and b not in compiled,
            costs.seconds(b, len(m), ready.get(b, costs.compile_s)),
        )
        for b, m in sorted(clusters, key=lambda c: min(c[1]))
    )
    real = sum(costs.trial_flops(shape) for shape in shapes)
    padded = sum(len(a.members) * costs.trial_flops(a.bucket) for a in assignments)
    return Plan(assignments, real, padded)


def _single(
    shapes: Sequence[Shape], members: list[int], ready: Mapping[Bucket, float], costs: Costs
) -> Bucket:
    """The envelope of the members, or the cheapest compiled or cached bucket that holds it."""
    envelope = Bucket.envelope(shapes[i] for i in members)
    holders = [b for b in ready if b.fits(envelope)]
    return min(holders, key=lambda b: costs.seconds(b, len(members), ready[b]), default=envelope)


def _merge(
    clusters: list[tuple[Bucket, list[int]]], ready: Mapping[Bucket, float], costs: Costs
) -> list[tuple[Bucket, list[int]]]:
    """Greedy agglomeration: apply the merge that saves the most estimated time, until none does
    (of equal savings, the pair that comes first).

    Compiled and cached buckets of the same static key join as empty clusters, so moving trials
    into one costs no compile (a cached one: its load). Each pair's saving is estimated once, in
    a heap: a claim of n shapes costs O(n²) estimates (256 shapes: 1.3 s against 49 s when every
    step estimated every pair again).
    """
    key = clusters[0][0].key
    used = {bucket for bucket, _ in clusters}
    clusters = clusters + [(b, []) for b in ready if b.key == key and b not in used]

    def cost(bucket: Bucket, members: list[int]) -> float:
        return costs.seconds(bucket, len(members), ready.get(bucket, costs.compile_s))

    # Ids follow the clusters' order (a merge's cluster comes last), so the heap's order of
    # equal savings is the order of the pairs.
    live = dict(enumerate(clusters))
    alone = {i: cost(bucket, members) for i, (bucket, members) in live.items()}
    heap: list[tuple[float, int, int, Bucket]] = []

    def consider(i: int, j: int) -> None:
        (a, ma), (b, mb) = live[i], live[j]
        if ma or mb:
            merged = Bucket.envelope([a, b])
            saving = alone[i] + alone[j] - cost(merged, ma + mb)
            if saving > 1e-12:
                heapq.heappush(heap, (-saving, i, j, merged))

    for i, j in itertools.combinations(live, 2):
        consider(i, j)
    new_ids = itertools.count(len(clusters))
    while heap:
        _, i, j, merged = heapq.heappop(heap)
        if i not in live or j not in live:
            continue  # one of the two merged already
        members = live.pop(i)[1] + live.pop(j)[1]
        new = next(new_ids)
        live[new], alone[new] = (merged, members), cost(merged, members)
        for other in list(live)[:-1]:
            consider(other, new)
    return [(b, sorted(m)) for b, m in live.values() if m]
