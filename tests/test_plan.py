"""The layered planner (omnicompile.graphs.plan): budget arithmetic of Algorithm 1, and the
invariants of the refinement (Algorithms 2-3) on random DAGs and plans (hypothesis)."""
import math

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnicompile.graphs.dag import PlanError, make_dag, unit_dag, unit_names
from omnicompile.graphs.plan import (
    check_plan, coalesce, greedy_order, plan_layered, propose, prune, realize, refine, runs_ok,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- strategies


@st.composite
def dags(draw):
    n = draw(st.integers(1, 7))
    units = [f"u{i}" for i in range(n)]
    chains, c, pos = {}, 0, 0
    for i, u in enumerate(units):
        if i and draw(st.booleans()):
            c, pos = c + 1, 0
        chains[u] = (f"g{c}", pos)
        pos += 1
    edges = set()
    for i in range(n - 1):   # a stream runs through each chain; chains may or may not be linked
        if chains[units[i]][0] == chains[units[i + 1]][0] or draw(st.booleans()):
            edges.add((units[i], units[i + 1]))
    for a, b in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=5)):
        if a < b:
            edges.add((units[a], units[b]))
    cost = {u: draw(st.sampled_from([0.0, 1.0, 1.0, 2.5, 7.0])) for u in units}
    cacheable = {u: draw(st.sampled_from([True, True, True, False])) for u in units}
    sides = {}
    for k in range(draw(st.integers(0, 2))):
        cons = draw(st.lists(st.sampled_from(units), min_size=1, max_size=n, unique=True))
        sides[f"s{k}"] = (draw(st.sampled_from([0.0, 0.5, 3.0])), cons)
    fixed = draw(st.sampled_from([0.0, 0.5, 4.0]))
    return make_dag(units, sorted(edges), cost, cacheable, sides, chains, fixed)


@st.composite
def dag_and_table(draw):
    dag = draw(dags())
    steps = draw(st.integers(1, 10))
    table = [draw(st.lists(st.booleans(), min_size=steps, max_size=steps)) for _ in unit_names(dag)]
    return dag, table, draw(st.integers(1, 6))


@st.composite
def dag_and_weights(draw):
    dag = draw(dags())
    steps = draw(st.integers(2, 10))
    w = st.one_of(st.floats(0, 10, allow_nan=False), st.just(math.inf))
    weights = [draw(st.lists(w, min_size=steps, max_size=steps)) for _ in unit_names(dag)]
    return dag, weights, draw(st.integers(1, 6)), draw(st.sampled_from([1.0, 1.2, 1.5, 2.0, 3.0, 5.0]))


def same_plan(a, b):
    return (a.reuse, a.dropped, a.writes, a.regions, a.saved) == (b.reuse, b.dropped, b.writes, b.regions, b.saved)


# ----------------------------------------------------------------------------- invariants


@SETTINGS
@given(dag_and_table())
def test_refine_keeps_every_invariant(case):
    dag, table, interval = case
    before = [row[:] for row in table]
    plan = refine(dag, table, interval)
    assert table == before                              # the input is not modified
    assert check_plan(dag, plan, interval) == []
    assert plan.steps == len(table[0])
    assert 0.0 <= plan.saved <= plan.total + 1e-9
    assert plan.ideal_speedup == pytest.approx(plan.total / (plan.total - plan.saved) if plan.saved < plan.total
                                               else 1.0)


@SETTINGS
@given(dag_and_table())
def test_refine_is_idempotent(case):
    dag, table, interval = case
    once = refine(dag, table, interval)
    assert same_plan(refine(dag, once.reuse, interval), once)


@SETTINGS
@given(dag_and_table())
def test_pruning_keeps_what_the_runtime_would_do(case):
    """Step 1 without the interval changes no execution: the runtime computes a reuse that
    has no cache yet, and never reuses a unit the rewrite cannot."""
    dag, table, _ = case
    t = [row[:] for row in table]
    prune(dag, t, interval=len(table[0]) + 1)
    assert t == realize(dag, table) or any(dag.nodes[u]["cost"] <= 0 for u in unit_names(dag))
    free = {i for i, u in enumerate(unit_names(dag)) if dag.nodes[u]["cost"] <= 0}
    real = realize(dag, table)
    for i in range(len(t)):
        assert t[i] == ([False] * len(t[i]) if i in free else real[i])


@SETTINGS
@given(dag_and_weights())
def test_greedy_order_respects_the_rules(case):
    dag, weights, interval, _ = case
    units = unit_names(dag)
    for staleness in (False, True):
        order = greedy_order(dag, weights, interval, staleness=staleness)
        assert len(set(order)) == len(order)
        table = [[False] * len(weights[0]) for _ in units]
        for i, t in order:
            assert t >= 1 and math.isfinite(weights[i][t])
            assert dag.nodes[units[i]]["cacheable"] and dag.nodes[units[i]]["cost"] > 0
            table[i][t] = True
        assert all(runs_ok(row, interval) for row in table)
        if not staleness:       # the paper's order: weights never decrease along the picks
            ws = [weights[i][t] for i, t in order]
            assert ws == sorted(ws)


@SETTINGS
@given(dag_and_weights())
def test_plan_layered_reaches_the_target_or_says_so(case):
    dag, weights, interval, target = case
    plan = plan_layered(dag, weights, target, interval)
    assert check_plan(dag, plan, interval) == []
    goal = (1 - 1 / target) * plan.total
    if plan.reached:
        assert plan.saved >= goal - 1e-6 * max(plan.total, 1)
    else:   # then even every allowed pair, refined, falls short
        full = [[False] * len(weights[0]) for _ in unit_names(dag)]
        for i, t in greedy_order(dag, weights, interval):
            full[i][t] = True
        assert same_plan(plan, refine(dag, full, interval))
        assert plan.saved < goal


@SETTINGS
@given(dag_and_table())
def test_regions_are_maximal_runs(case):
    dag, table, interval = case
    plan = refine(dag, table, interval)
    regions = coalesce(dag, plan.reuse)
    assert regions == plan.regions
    assert len(plan.rows()) <= 2 ** len(regions)
    for t in range(plan.steps):
        assert plan.row(t) == tuple(r.row[t] for r in regions)
    assert plan.row(plan.steps) == (False,) * len(regions)      # past the plan: computed


# ----------------------------------------------------------------------------- budget arithmetic


def chain(n=4, cost=1.0, fixed=0.0, group="g"):
    units = [f"b{i}" for i in range(n)]
    return make_dag(units, [(units[i], units[i + 1]) for i in range(n - 1)], {u: cost for u in units},
                    chains={u: (group, i) for i, u in enumerate(units)}, fixed=fixed)


def test_algorithm1_stops_once_the_saving_is_reached():
    dag = chain(4)                       # 4 units x 10 steps = 40 units of latency
    w = [[t + 10 * i for t in range(10)] for i in range(4)]
    table = propose(dag, w, target_speedup=2.0, interval=10, staleness=False)
    taken = [(i, t) for i in range(4) for t in range(10) if table[i][t]]
    # 1 - 1/2 of 40 = 20: the 20 lowest weights, i.e. units 0 and 1 at steps 1..9 and unit 2 at step 1
    assert len(taken) == 20
    assert taken == [(0, t) for t in range(1, 10)] + [(1, t) for t in range(1, 10)] + [(2, 1), (2, 2)]
    assert propose(dag, w, target_speedup=1.0, interval=10) == [[False] * 10 for _ in range(4)]


def test_target_counts_the_whole_call():
    dag = chain(2, cost=1.0, fixed=2.0)  # a call costs 4, the cacheable part 2: at most 2x
    w = [[1.0] * 11 for _ in range(2)]
    plan = plan_layered(dag, w, 1.5, interval=12)
    assert plan.reached and plan.saved >= (1 - 1 / 1.5) * plan.total
    assert plan.total == 11 * 4.0
    over = plan_layered(dag, w, 2.5, interval=12)
    assert not over.reached and over.ideal_speedup < 2.0


def test_interval_bounds_the_saving():
    dag = chain(4)
    w = [[1.0] * 10 for _ in range(4)]
    plan = plan_layered(dag, w, 3.0, interval=2)     # no two reuses in a row: at most steps 1,3,5,7,9
    assert not plan.reached
    assert all("RR" not in m for m in plan.marks().values())
    assert plan.saved_fraction == pytest.approx(0.5)
    assert plan.ideal_speedup == pytest.approx(2.0)


def test_staleness_prices_long_runs():
    dag = chain(1)
    w = [[math.inf, 1.0, 1.0, 1.0, 1.2, 1.2, 1.2]]
    static = greedy_order(dag, w, interval=7, staleness=False)
    aged = greedy_order(dag, w, interval=7, staleness=True)
    assert static[:3] == [(0, 3), (0, 2), (0, 1)]
    # step 2 next to step 3 would read a cache 2 steps old (cost 2 x 1.0): steps 1 and 6 come first
    assert aged[:3] == [(0, 3), (0, 1), (0, 6)]


def test_dropped_side_work_counts_as_saved():
    units = ["a", "b"]
    dag = make_dag(units, [("a", "b")], {"a": 1.0, "b": 1.0}, sides={"rope": (0.5, ["a", "b"])})
    plan = refine(dag, [[False, True, False], [False, True, True]], interval=5)
    assert plan.dropped == {"rope": [False, True, False]}      # step 2: "a" computes, it needs the table
    assert plan.saved == pytest.approx(3 * 1.0 + 0.5)
    assert plan.total == pytest.approx(3 * 2.5)


# ----------------------------------------------------------------------------- refinement examples


def test_child_refresh_moves_to_the_parents_refresh():
    dag = chain(2)
    plan = refine(dag, [[False, False, True, False, False], [False, False, False, False, False]], interval=5)
    assert plan.marks() == {"b0": "CCRCC", "b1": "CCRCC"}     # b1 no longer computes from a's stale output
    assert [r.units for r in plan.regions] == [("b0", "b1")]


def test_stale_parent_refreshes_when_moving_breaks_the_interval():
    dag = chain(2)
    plan = refine(dag, [[False, True, True, False], [False, True, False, False]], interval=3)
    assert plan.marks() == {"b0": "CRRC", "b1": "CRRC"}        # moved: b1 reuses steps 1-2, refreshes at 3
    plan = refine(dag, [[False, False, True, False], [False, True, False, False]], interval=2)
    # moving b1's refresh from step 2 to 3 would make it reuse 2 steps in a row: b0 refreshes at 2
    assert plan.marks() == {"b0": "CCCC", "b1": "CRCC"}
    assert check_plan(dag, plan, 2) == []


def test_unfounded_and_useless_reuse_is_removed():
    dag = make_dag(["a", "b"], [], {"a": 1.0, "b": 0.0}, cacheable={"a": True, "b": True})
    plan = refine(dag, [[True, True, False], [False, True, True]], interval=5)
    assert plan.marks() == {"a": "CRC", "b": "CCC"}
    assert plan.writes == [[True, False, False], [False, False, False]]


def test_coalescing_follows_chains():
    units = ["a0", "a1", "b0", "b1"]
    dag = make_dag(units, [("a0", "a1"), ("a1", "b0"), ("b0", "b1")],
                   chains={"a0": ("A", 0), "a1": ("A", 1), "b0": ("B", 0), "b1": ("B", 1)})
    plan = refine(dag, [[False, True, True]] * 4, interval=5)
    assert [r.units for r in plan.regions] == [("a0", "a1"), ("b0", "b1")]
    assert plan.rows() == [(False, False), (True, True)]


def test_bad_inputs_raise_plan_error():
    with pytest.raises(PlanError, match="cycle"):
        make_dag(["a", "b"], [("a", "b"), ("b", "a")])
    with pytest.raises(PlanError, match="not in the DAG"):
        make_dag(["a"], [("a", "z")])
    with pytest.raises(PlanError, match="rows"):
        refine(chain(2), [[False]], interval=2)
    with pytest.raises(PlanError, match="interval"):
        refine(chain(2), [[False], [False]], interval=0)
    with pytest.raises(PlanError, match="target speedup"):
        plan_layered(chain(2), [[1.0, 1.0]] * 2, 0.5, 2)


# ----------------------------------------------------------------------------- the DAG of an FX graph


class Toy(torch.nn.Module):
    """Three blocks on a stream, a side computation only the blocks read (a rotary table),
    and glue between block 1 and 2."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))
        self.emb = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x, t):
        rope = torch.sin(t * 3.0)                 # only the blocks read it
        temb = self.emb(t)                        # blocks and the epilogue read it
        h = self.lin[0](x) * rope + temb
        h = self.lin[1](h) * rope + temb
        h = h * 2.0                               # glue
        h = self.lin[2](h) * rope + temb
        return self.out(h + temb)


def test_unit_dag_of_an_fx_graph():
    gm = fx.symbolic_trace(Toy())
    nodes = list(gm.graph.nodes)
    by = {n.name: n for n in nodes}

    units = {"u0": [by[n] for n in ("lin_0", "mul_1", "add")], "u1": [by[n] for n in ("lin_1", "mul_2", "add_1")],
             "u2": [by[n] for n in ("lin_2", "mul_4", "add_2")]}
    streams = {"u0": [by["x"]], "u1": [by["add"]], "u2": [by["mul_3"]]}
    dag = unit_dag(nodes, units, stream_inputs=streams, cost=lambda ns: float(len(list(ns))))
    assert unit_names(dag) == ["u0", "u1", "u2"]
    unit_edges = {(a, b) for a, b in dag.edges if dag.nodes[a]["kind"] == "unit"}
    assert unit_edges == {("u0", "u1"), ("u1", "u2")}          # u1 -> u2 through the glue
    sides = [n for n, d in dag.nodes(data=True) if d["kind"] == "side"]
    assert len(sides) == 1 and set(dag.successors(sides[0])) == {"u0", "u1", "u2"}
    assert set(dag.nodes[sides[0]]["fx_nodes"]) == {"mul", "sin"}   # t * 3.0 and sin: the rotary table
    # temb, the glue (mul_3), the epilogue (add_3, out): always computed
    assert dag.graph["fixed"] == 4.0
    assert [dag.nodes[u]["cost"] for u in unit_names(dag)] == [3.0, 3.0, 3.0]
