"""The unit dependency DAG the layered planner works on (:mod:`omnicompile.graphs.plan`).

**The DAG** (:func:`unit_dag` from an FX graph, :func:`make_dag` from lists).  Nodes:

* ``kind="unit"`` — a cache unit (one transformer block, roughly).  ``cost``: its latency
  (the cost model's FLOPs); ``cacheable``: whether the rewrite can reuse it; ``chain`` and
  ``position``: the block group it belongs to and its index there (adjacent units of one chain
  may share a guarded region).  A unit's parents are the units whose values it reads (stream
  dependencies, through glue code if any).
* ``kind="side"`` — a computation outside every unit that only units consume (rotary tables,
  say), grouped by the set of units that consume it; edges go to those units.  Never reused:
  it runs when one of its consumers computes.

``dag.graph["fixed"]`` is the latency of everything else (prologue, glue, epilogue: always
computed).  A call costs ``fixed + Σ unit + Σ side``; a generation ``steps`` calls.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional, Sequence

import networkx as nx

__all__ = ["PlanError", "make_dag", "unit_dag", "unit_names", "side_names"]


class PlanError(ValueError):
    """A DAG, table or plan that the planner cannot use; the message names what is wrong."""


def make_dag(units: Sequence[str], edges: Iterable[tuple[str, str]] = (), cost: Optional[Mapping[str, float]] = None,
             cacheable: Optional[Mapping[str, bool]] = None, sides: Optional[Mapping[str, tuple[float, Iterable[str]]]] = None,
             chains: Optional[Mapping[str, tuple[str, int]]] = None, fixed: float = 0.0) -> nx.DiGraph:
    """A DAG from lists.  ``units`` in execution order; ``edges`` between units;
    ``sides``: ``{name: (cost, consumer units)}``; ``chains``: ``{unit: (chain, position)}``
    (default: every unit its own chain)."""
    g = nx.DiGraph(fixed=float(fixed))
    for i, u in enumerate(units):
        ch, pos = (chains or {}).get(u, (u, 0))
        g.add_node(u, kind="unit", cost=float((cost or {}).get(u, 1.0)), cacheable=bool((cacheable or {}).get(u, True)),
                   order=i, chain=ch, position=int(pos))
    for a, b in edges:
        if a not in g or b not in g:
            raise PlanError(f"edge {a!r} -> {b!r} names a unit that is not in the DAG")
        g.add_edge(a, b, kind="stream")
    for i, (name, (c, consumers)) in enumerate((sides or {}).items()):
        g.add_node(name, kind="side", cost=float(c), cacheable=False, order=-1 - i, chain=name, position=0)
        for u in consumers:
            if u not in g or g.nodes[u]["kind"] != "unit":
                raise PlanError(f"side computation {name!r} lists consumer {u!r}, which is not a unit")
            g.add_edge(name, u, kind="side")
    if not nx.is_directed_acyclic_graph(g):
        raise PlanError("the unit graph has a cycle")
    return g


def unit_names(dag: nx.DiGraph) -> list[str]:
    """The units of the DAG in execution order (the rows of a plan)."""
    return sorted((n for n, d in dag.nodes(data=True) if d["kind"] == "unit"), key=lambda n: dag.nodes[n]["order"])


def side_names(dag: nx.DiGraph) -> list[str]:
    return sorted((n for n, d in dag.nodes(data=True) if d["kind"] == "side"), key=lambda n: -dag.nodes[n]["order"])


def unit_dag(nodes: Sequence, units: Mapping[str, Sequence], *, stream_inputs: Optional[Mapping[str, Iterable]] = None,
             chains: Optional[Mapping[str, tuple[str, int]]] = None, cacheable: Optional[Mapping[str, bool]] = None,
             cost: Optional[Callable[[Iterable], float]] = None) -> nx.DiGraph:
    """The unit DAG of an FX graph.

    ``nodes``: the graph's nodes in order; ``units``: ``{name: nodes of the unit}`` (in
    execution order); ``stream_inputs``: per unit, the outside values it reads as streams
    (they are needed even when the unit reuses: ``in + r``); ``cost(nodes) -> float`` the
    latency of a set of nodes (default: FLOPs, :func:`omnicompile.graphs.cost.node_flops`).
    Edges: unit ``a`` -> unit ``b`` when ``b`` reads a value computed in ``a`` (directly or
    through glue code outside units).  Side computations: the non-unit nodes all of whose
    readers are units reading them as side inputs (or other such nodes), grouped by the
    set of units that finally consume them.
    """
    if cost is None:
        from .cost import node_flops

        def cost(ns):
            return float(sum(node_flops(n) for n in ns))
    unit_of = {}
    for name, ns in units.items():
        for n in ns:
            unit_of[n] = name
    streams = {name: set(stream_inputs.get(name, ())) if stream_inputs else set() for name in units}
    compute_ops = ("call_function", "call_method", "call_module")
    # units whose values a non-unit node carries (glue), memoised in graph order
    carries: dict = {}
    for n in nodes:
        if n in unit_of:
            continue
        src: set = set()
        for a in n.all_input_nodes:
            if a in unit_of:
                src.add(unit_of[a])
            else:
                src |= carries.get(a, set())
        carries[n] = src
    edges = set()
    for n in nodes:
        u = unit_of.get(n)
        if u is None:
            continue
        for a in n.all_input_nodes:
            pu = unit_of.get(a)
            srcs = {pu} if pu is not None else carries.get(a, set())
            for p in srcs:
                if p != u:
                    edges.add((p, u))
    # side computations: reverse order, a node whose every reader is a side reader
    side_of: dict = {}      # node -> frozenset of consumer units
    for n in reversed(list(nodes)):
        if n in unit_of or n.op not in compute_ops or not n.users:
            continue
        consumers: set = set()
        ok = True
        for usr in n.users:
            if usr in unit_of:
                if n in streams[unit_of[usr]]:
                    ok = False
                    break
                consumers.add(unit_of[usr])
            elif usr in side_of:
                consumers |= side_of[usr]
            else:
                ok = False
                break
        if ok and consumers:
            side_of[n] = frozenset(consumers)
    groups: dict[frozenset, list] = {}
    for n in nodes:
        if n in side_of:
            groups.setdefault(side_of[n], []).append(n)
    names = list(units)
    unit_cost = {name: cost(units[name]) for name in names}
    sides = {}
    for k, (cons, ns) in enumerate(sorted(groups.items(), key=lambda kv: min(names.index(u) for u in kv[0]))):
        sides[f"side{k}"] = (cost(ns), sorted(cons, key=names.index))
    in_units_or_sides = set(unit_of) | set(side_of)
    fixed = cost([n for n in nodes if n not in in_units_or_sides and n.op in compute_ops])
    dag = make_dag(names, sorted(edges, key=lambda e: (names.index(e[0]), names.index(e[1]))), unit_cost,
                   cacheable, sides, chains, fixed)
    for k, (cons, ns) in enumerate(sorted(groups.items(), key=lambda kv: min(names.index(u) for u in kv[0]))):
        dag.nodes[f"side{k}"]["fx_nodes"] = [n.name for n in ns]
    return dag
