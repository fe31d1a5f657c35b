"""Layered Cache planning: a budgeted (unit, step) reuse schedule, refined on the unit DAG.

OmniCache (multidimensional hierarchical, ``../shared/seeds/002_…`` §3.4, Algorithms 1–3,
Appendix B).  Pure functions over a networkx DAG and boolean tables, so the invariants below
are property-tested on random DAGs and plans (tests/test_plan.py).

The unit DAG is :mod:`omnicompile.graphs.dag`.

**A plan** is a table ``reuse[u][t]`` over the cacheable-or-not units (DAG order) and the
steps of one generation: True = unit ``u`` reuses its cached residual at step ``t``
(``out = in + r``, ``r`` = ``out - in`` of its last computed step), False = it computes and
refreshes ``r``.  *Cache steps* are the reuse steps; *refresh steps* the computed ones.

**Algorithm 1** (:func:`propose`): pairs ``(u, t)`` by ``w = Δquality / latency`` (lowest
first; ties: later step, then later unit), taken greedily until the saved latency reaches
``1 - 1/s_r`` of the generation (the pseudocode's running sum of the pairs' latency); a pair
is skipped when its unit is not cacheable or free, ``t`` is 0 or protected, ``w`` is not
finite, or taking it would make its unit reuse more than ``N - 1`` steps in a row (caching
interval ``N``: a refresh at least every ``N`` steps).  ``Δ`` is profiled one pair at a time
(a cache one step old); with ``staleness=True`` (default) the greedy prices the ``k``-th
reuse of a run at ``k·w`` — a cache ``k`` steps old — and re-sorts lazily
(:func:`greedy_order`); ``staleness=False`` is the paper's static sort.

**Algorithms 2–3** (:func:`refine`), in this order:

1. *remove cache steps that change nothing* — a reuse with no earlier refresh of its unit
   (the runtime would compute it anyway: no cache yet), or of a unit that costs nothing,
   becomes a refresh; runs longer than ``N - 1`` are broken (every ``N``-th reuse refreshes);
2. *align refresh steps with the parents'* (topological order) — a unit that refreshes at a
   step where a parent unit reuses would compute from a stale input and store a residual
   made from it: its refresh moves to the first later step where all its parents refresh
   (it reuses until then; the paper's "minimum parent cache step ≥ current step"); where
   that would break the interval, the stale ancestors refresh at that step instead.  (On
   the reference model this lowers the deviation at equal speedup: bench/profile_layered.py);
3. *drop computations whose every consumer reuses* — a reusing unit still reads its input
   (``in + r``), so no unit's work is ever dead; side work is: a side computation is
   skipped at the steps where all of its consumers reuse (the rewrite's dead-code
   elimination does it; the plan counts it as saved: ``dropped``);
4. *remove consecutive cache writes with identical outputs* — a refresh followed by another
   refresh writes a residual nobody reads (the next write replaces it): ``writes[u][t]`` is
   True only where the residual written at ``t`` is read.  Informational: the runtime's
   variants return the residual of every computed region, which costs one subtraction;
5. *coalesce* (:func:`coalesce`) — maximal runs of adjacent units of one chain with identical
   rows become one guarded region (fewer branches, one residual per stream per region).

**Invariants** (:func:`check_plan` tests them; hypothesis drives it on random DAGs):

* *founded*: every reuse of ``u`` at ``t`` follows a refresh of ``u`` at some ``t' < t``;
  step 0 computes every unit;
* *safe*: only reusable units reuse (cacheable, and costing something);
* *interval*: no unit reuses more than ``N - 1`` consecutive steps;
* *aligned*: a reusable unit that computes at ``t`` has every parent unit computing at ``t``
  (per step, the reused units are closed under descendants among reusable units: a unit
  never computes from a reused parent, it may reuse while its parents compute; a unit that
  cannot reuse computes at every step, from whatever its parents give it);
* *dropped*: a side computation is dropped at ``t`` iff all of its consumers reuse at ``t``;
* *writes*: ``writes[u][t]`` iff ``u`` computes at ``t`` and reuses at ``t + 1``;
* *coalesced*: regions partition the units of each chain into runs of consecutive positions
  with identical rows; two adjacent regions of one chain differ (maximal); non-cacheable
  units are regions of their own;
* *idempotent*: ``refine(dag, refine(dag, p).reuse) == refine(dag, p)``; a plan that already
  keeps every invariant is returned unchanged.

:func:`plan_layered` puts it together: the greedy order of Algorithm 1, refined, and the
shortest prefix of that order whose *refined* plan reaches the target (refinement may add
or remove reuse) — or the whole order, with ``reached=False``, when nothing does.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Iterable, Mapping, Optional, Sequence

import networkx as nx

from .dag import PlanError, side_names, unit_names

__all__ = ["Region", "LayeredPlan", "propose", "greedy_order", "refine", "derive_plan", "coalesce", "plan_layered",
           "check_plan", "saved_latency", "realize", "prune", "runs_ok"]


# ============================================================================ plans


@dataclasses.dataclass(frozen=True)
class Region:
    """Consecutive units ``units`` (positions ``first..last`` of ``chain``) with one row."""

    chain: str
    first: int
    last: int
    units: tuple
    row: tuple     # reuse per step


@dataclasses.dataclass
class LayeredPlan:
    units: list                 # unit names, DAG order
    steps: int
    reuse: list                 # [unit][step] -> bool
    dropped: dict               # side name -> [step] -> bool
    writes: list                # [unit][step] -> bool (residual written and read later)
    regions: list               # [Region], DAG order
    saved: float                # latency saved over the generation
    total: float                # latency of the generation, nothing reused
    reached: bool = True        # whether the target was met (plan_layered)
    target: Optional[float] = None

    @property
    def saved_fraction(self) -> float:
        return self.saved / self.total if self.total > 0 else 0.0

    @property
    def ideal_speedup(self) -> float:
        left = self.total - self.saved
        return self.total / left if self.total > 0 and left > 0 else 1.0

    def row(self, step: int) -> tuple:
        """Reuse per region at ``step`` (steps past the plan: all computed)."""
        if not 0 <= step < self.steps:
            return (False,) * len(self.regions)
        return tuple(r.row[step] for r in self.regions)

    def rows(self) -> list[tuple]:
        """The distinct per-region decisions, in order of first use."""
        seen: dict = {}
        for t in range(self.steps):
            seen.setdefault(self.row(t), None)
        return list(seen)

    def marks(self) -> dict:
        """``{unit: "CRRC..."}``."""
        return {u: "".join("R" if x else "C" for x in self.reuse[i]) for i, u in enumerate(self.units)}


def _check_table(dag: nx.DiGraph, reuse, steps: Optional[int] = None) -> tuple[list, int]:
    units = unit_names(dag)
    if len(reuse) != len(units):
        raise PlanError(f"plan has {len(reuse)} rows for {len(units)} units")
    n = len(reuse[0]) if reuse else (steps or 0)
    if steps is not None and n != steps:
        raise PlanError(f"plan covers {n} steps, expected {steps}")
    for i, row in enumerate(reuse):
        if len(row) != n:
            raise PlanError(f"row {i} ({units[i]}) has {len(row)} steps, expected {n}")
    return [[bool(x) for x in row] for row in reuse], n


def _total(dag: nx.DiGraph, steps: int) -> float:
    return steps * (float(dag.graph.get("fixed", 0.0)) + sum(d["cost"] for _, d in dag.nodes(data=True)))


def saved_latency(dag: nx.DiGraph, reuse, dropped: Optional[Mapping] = None) -> float:
    units = unit_names(dag)
    s = sum(dag.nodes[u]["cost"] for i, u in enumerate(units) for x in reuse[i] if x)
    for name, row in (dropped or {}).items():
        s += dag.nodes[name]["cost"] * sum(1 for x in row if x)
    return s


def realize(dag: nx.DiGraph, reuse) -> list:
    """What the runtime does with a table: a reuse without a cache yet (no earlier refresh
    of the unit) is computed, and a non-cacheable unit always computes."""
    units = unit_names(dag)
    out = []
    for i, u in enumerate(units):
        has, row = False, []
        ok = dag.nodes[u]["cacheable"]
        for x in reuse[i]:
            r = bool(x) and has and ok
            row.append(r)
            has = has or not r
        out.append(row)
    return out


def runs_ok(row: Sequence[bool], interval: int) -> bool:
    run = 0
    for x in row:
        run = run + 1 if x else 0
        if run > interval - 1:
            return False
    return True


# ---------------------------------------------------------------------------- Algorithm 1


def greedy_order(dag: nx.DiGraph, weights: Sequence[Sequence[float]], interval: int,
                 protected: Iterable[int] = (), staleness: bool = True) -> list[tuple[int, int]]:
    """Algorithm 1's picks in order, run until no pair is left: ``(unit index, step)`` by
    lowest weight (ties: later step, later unit), skipping pairs that are not allowed
    (see the module docstring).  Prefixes of this order are the proposals.

    ``staleness=False`` is the paper's static order.  ``staleness=True`` (default) prices a
    pair by what it adds given the pairs already taken: the ``k``-th reuse of a run reads a
    cache ``k`` steps old and counts ``k`` times its weight, so a pair that extends a run
    costs its own ``k·w`` plus ``w`` for each reuse after it in the run (lazy greedy: these
    costs only grow as pairs are taken).  On the reference model this lowers the deviation at
    equal speedup (bench/profile_layered.py)."""
    units = unit_names(dag)
    if len(weights) != len(units):
        raise PlanError(f"weights have {len(weights)} rows for {len(units)} units")
    if interval < 1:
        raise PlanError(f"caching interval must be >= 1, got {interval}")
    steps = len(weights[0]) if weights else 0
    prot = set(protected)
    heap = []
    for i, u in enumerate(units):
        if len(weights[i]) != steps:
            raise PlanError(f"weights row {i} ({u}) has {len(weights[i])} steps, expected {steps}")
        if not dag.nodes[u]["cacheable"] or dag.nodes[u]["cost"] <= 0:
            continue
        for t in range(1, steps):
            w = weights[i][t]
            if t in prot or w is None or not math.isfinite(w) or w < 0:
                continue
            heap.append((float(w), -t, -i, i, t))
    heapq.heapify(heap)
    chosen = [[False] * steps for _ in units]
    order = []
    while heap:
        key, nt, ni, i, t = heapq.heappop(heap)
        row = chosen[i]
        left = 0
        k = t - 1
        while k >= 1 and row[k]:
            left += 1
            k -= 1
        right = []
        k = t + 1
        while k < steps and row[k]:
            right.append(k)
            k += 1
        if left + 1 + len(right) > interval - 1:
            continue
        if staleness:
            cost = (left + 1) * (weights[i][t] + sum(weights[i][r] for r in right))
            if cost > key * (1 + 1e-12) and heap and (cost, nt, ni) > heap[0][:3]:
                heapq.heappush(heap, (cost, nt, ni, i, t))
                continue
        row[t] = True
        order.append((i, t))
    return order


def propose(dag: nx.DiGraph, weights: Sequence[Sequence[float]], target_speedup: float, interval: int,
            protected: Iterable[int] = (), staleness: bool = True) -> list:
    """Algorithm 1: the greedy table, stopped once the saved latency reaches
    ``1 - 1/target_speedup`` of the generation (or when no pair is left)."""
    if target_speedup < 1:
        raise PlanError(f"target speedup must be >= 1, got {target_speedup}")
    units = unit_names(dag)
    steps = len(weights[0]) if weights else 0
    goal = (1.0 - 1.0 / target_speedup) * _total(dag, steps)
    reuse = [[False] * steps for _ in units]
    s = 0.0
    for i, t in greedy_order(dag, weights, interval, protected, staleness):
        if s >= goal - 1e-12 * max(goal, 1.0):
            break
        reuse[i][t] = True
        s += dag.nodes[units[i]]["cost"]
    return reuse


# ---------------------------------------------------------------------------- Algorithms 2-3


def _reusable(dag: nx.DiGraph, u: str) -> bool:
    """Cacheable and not free: the units a plan may reuse (the others always compute)."""
    d = dag.nodes[u]
    return bool(d["cacheable"]) and d["cost"] > 0


def _parent_units(dag: nx.DiGraph, u: str) -> list[str]:
    return [p for p in dag.predecessors(u) if dag.nodes[p]["kind"] == "unit"]


def prune(dag: nx.DiGraph, reuse: list, interval: int) -> None:
    """Step 1 (in place): reuse without a cache, of a free or non-cacheable unit, or past
    the interval becomes a refresh."""
    for i, u in enumerate(unit_names(dag)):
        d = dag.nodes[u]
        row = reuse[i]
        has, run = False, 0
        for t in range(len(row)):
            if row[t] and (not has or not d["cacheable"] or d["cost"] <= 0 or run + 1 > interval - 1):
                row[t] = False
            if row[t]:
                run += 1
            else:
                has, run = True, 0


def _stale_closure(dag: nx.DiGraph, u: str) -> list[str]:
    """The unit ancestors of ``u`` reached through reusable units (a unit that cannot reuse
    always computes, so what lies above it need not)."""
    out, stack, seen = [], _parent_units(dag, u), set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        if _reusable(dag, p):
            stack.extend(_parent_units(dag, p))
    return out


def _align(dag: nx.DiGraph, reuse: list, interval: int) -> None:
    """Step 2 (in place): every refresh of a cacheable unit happens where its parents refresh."""
    units = unit_names(dag)
    idx = {u: i for i, u in enumerate(units)}
    steps = len(reuse[0]) if reuse else 0
    for u in units:
        if not _reusable(dag, u):
            continue
        parents = [idx[p] for p in _parent_units(dag, u)]
        if not parents:
            continue
        row = reuse[idx[u]]
        t = 1
        while t < steps:
            if row[t] or all(not reuse[p][t] for p in parents):
                t += 1
                continue
            prev = t - 1
            while prev > 0 and row[prev]:
                prev -= 1          # last refresh before t (step 0 always refreshes)
            t2 = t + 1             # the parents' next common refresh step
            while t2 < steps and any(reuse[p][t2] for p in parents):
                t2 += 1
            if (t2 - 1) - prev <= interval - 1:
                for k in range(t, t2):
                    row[k] = True
                if t2 < steps:
                    row[t2] = False    # the refresh moves here
                t = t2 + 1
            else:                  # moving would break the interval: refresh the parents
                for a in _stale_closure(dag, u):
                    reuse[idx[a]][t] = False
                t += 1


def _dropped(dag: nx.DiGraph, reuse: list) -> dict:
    """Step 3: side computations skipped where every consumer reuses."""
    idx = {u: i for i, u in enumerate(unit_names(dag))}
    steps = len(reuse[0]) if reuse else 0
    out = {}
    for s in side_names(dag):
        cons = [idx[c] for c in dag.successors(s)]
        out[s] = [bool(cons) and all(reuse[c][t] for c in cons) for t in range(steps)]
    return out


def _writes(reuse: list) -> list:
    """Step 4: a refresh whose residual is read (the next step of the unit reuses it;
    a refresh followed by a refresh writes a residual the second write replaces)."""
    out = []
    for row in reuse:
        n = len(row)
        out.append([not row[t] and t + 1 < n and row[t + 1] for t in range(n)])
    return out


def coalesce(dag: nx.DiGraph, reuse: Sequence[Sequence[bool]]) -> list[Region]:
    """Step 5: maximal runs of adjacent cacheable units of one chain with identical rows."""
    units = unit_names(dag)
    regions: list[Region] = []
    cur: list = []

    def flush():
        if cur:
            d0, d1 = dag.nodes[cur[0][0]], dag.nodes[cur[-1][0]]
            regions.append(Region(d0["chain"], d0["position"], d1["position"], tuple(u for u, _ in cur),
                                  tuple(cur[0][1])))
            cur.clear()

    for i, u in enumerate(units):
        d = dag.nodes[u]
        row = tuple(bool(x) for x in reuse[i])
        if cur:
            p = dag.nodes[cur[-1][0]]
            if not (d["cacheable"] and p["cacheable"] and d["chain"] == p["chain"]
                    and d["position"] == p["position"] + 1 and row == cur[-1][1]):
                flush()
        cur.append((u, row))
    flush()
    return regions


def refine(dag: nx.DiGraph, reuse: Sequence[Sequence[bool]], interval: int) -> LayeredPlan:
    """Algorithms 2–3: the refined plan of a proposal (the table is not modified)."""
    if interval < 1:
        raise PlanError(f"caching interval must be >= 1, got {interval}")
    table, steps = _check_table(dag, reuse)
    prune(dag, table, interval)
    _align(dag, table, interval)
    prune(dag, table, interval)   # recalculated counters: alignment never adds unfounded reuse
    return derive_plan(dag, table, steps)


def derive_plan(dag: nx.DiGraph, table: list, steps: int) -> LayeredPlan:
    """The plan of a reuse table taken as it is (steps 3–5: dropped side work, cache writes,
    regions, latencies) — :func:`refine` after pruning and alignment, or a table read from a
    file that :func:`check_plan` is to judge."""
    dropped = _dropped(dag, table)
    return LayeredPlan(unit_names(dag), steps, table, dropped, _writes(table), coalesce(dag, table),
                       saved_latency(dag, table, dropped), _total(dag, steps))


def plan_layered(dag: nx.DiGraph, weights: Sequence[Sequence[float]], target_speedup: float, interval: int,
                 protected: Iterable[int] = (), staleness: bool = True) -> LayeredPlan:
    """Algorithm 1 and refinement: the shortest prefix of the greedy order whose refined
    plan saves ``1 - 1/target_speedup`` of the generation (see the module docstring)."""
    if target_speedup < 1:
        raise PlanError(f"target speedup must be >= 1, got {target_speedup}")
    units = unit_names(dag)
    steps = len(weights[0]) if weights else 0
    total = _total(dag, steps)
    goal = (1.0 - 1.0 / target_speedup) * total
    eps = 1e-9 * max(total, 1.0)
    order = greedy_order(dag, weights, interval, protected, staleness)
    table = [[False] * steps for _ in units]
    best = refine(dag, table, interval)
    if best.saved >= goal - eps:
        best.target = target_speedup
        return best
    # the refined saving is not monotone in the prefix, so scan in order
    for i, t in order:
        table[i][t] = True
        p = refine(dag, table, interval)
        if p.saved >= goal - eps:
            p.target = target_speedup
            return p
        best = p
    best.reached = False
    best.target = target_speedup
    return best


# ---------------------------------------------------------------------------- invariants


def check_plan(dag: nx.DiGraph, plan: LayeredPlan, interval: int) -> list[str]:
    """The invariants of the module docstring that ``plan`` breaks (empty: none)."""
    bad: list[str] = []
    units = unit_names(dag)
    if plan.units != units:
        return [f"plan units {plan.units} are not the DAG's {units}"]
    idx = {u: i for i, u in enumerate(units)}
    R = plan.reuse
    S = plan.steps
    for i, u in enumerate(units):
        has = False
        run = 0
        for t in range(S):
            if R[i][t]:
                if not has:
                    bad.append(f"founded: {u} reuses at step {t} before any refresh")
                if not _reusable(dag, u):
                    bad.append(f"safe: {u} reuses at step {t} but is not cacheable or costs nothing")
                run += 1
                if run > interval - 1:
                    bad.append(f"interval: {u} reuses {run} steps in a row at step {t}")
            else:
                has, run = True, 0
                if _reusable(dag, u):
                    for p in _parent_units(dag, u):
                        if R[idx[p]][t]:
                            bad.append(f"aligned: {u} refreshes at step {t} while its parent {p} reuses")
    for s in side_names(dag):
        cons = [idx[c] for c in dag.successors(s)]
        for t in range(S):
            want = bool(cons) and all(R[c][t] for c in cons)
            if plan.dropped.get(s, [None] * S)[t] != want:
                bad.append(f"dropped: side {s} at step {t} is {plan.dropped.get(s)} but consumers say {want}")
    for i, u in enumerate(units):
        for t in range(S):
            want = not R[i][t] and t + 1 < S and R[i][t + 1]
            if plan.writes[i][t] != want:
                bad.append(f"writes: {u} at step {t}")
    covered = [u for r in plan.regions for u in r.units]
    if covered != units:
        bad.append(f"coalesced: regions cover {covered}, units are {units}")
    for r in plan.regions:
        rows = {tuple(R[idx[u]]) for u in r.units}
        if len(rows) != 1 or tuple(r.row) != next(iter(rows)):
            bad.append(f"coalesced: region {r.units} mixes rows")
        pos = [dag.nodes[u]["position"] for u in r.units]
        if any(dag.nodes[u]["chain"] != r.chain for u in r.units) or pos != list(range(r.first, r.last + 1)):
            bad.append(f"coalesced: region {r.units} is not a run of one chain")
        if len(r.units) > 1 and not all(dag.nodes[u]["cacheable"] for u in r.units):
            bad.append(f"coalesced: region {r.units} merges a non-cacheable unit")
    for a, b in zip(plan.regions, plan.regions[1:]):
        da, db = dag.nodes[a.units[-1]], dag.nodes[b.units[0]]
        if (a.chain == b.chain and da["position"] + 1 == db["position"] and a.row == b.row
                and da["cacheable"] and db["cacheable"]):
            bad.append(f"coalesced: regions {a.units} and {b.units} could merge")
    return bad
