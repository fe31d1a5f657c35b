"""The layered policy's view of a graph: every unit of every block group, the single-unit
spans the rewrite can reuse, the unit dependency DAG with FLOPs as latency, and the symbolic
costs (:func:`analyze_units`)."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Optional, Sequence

import torch.fx as fx

from omnicompile.graphs.cost import Cost, graph_size_symbols, node_flops, region_cost
from omnicompile.graphs.dag import unit_dag
from omnicompile.passes.common import Reason, is_param_placeholder, node_signature
from omnicompile.passes.spans import Span, make_span, stream_inputs

__all__ = ["UnitGraph", "analyze_units", "unit_fingerprint"]



@dataclasses.dataclass
class UnitGraph:
    """What the layered policy knows about one graph: its units (``group#index``, DAG
    order), the single-unit spans (None where a unit cannot be reused alone, with the
    reason), the unit DAG with FLOPs as latency, and the symbolic costs."""

    gm: fx.GraphModule
    analysis: Any
    units: list[str]
    where: dict[str, tuple]                 # unit -> (group object, index)
    unit_spans: dict[str, Optional[Span]]
    refused: list[Reason]
    dag: Any
    costs: dict[str, Cost]                  # unit / "fixed" -> symbolic cost
    sizes: dict[str, int]                   # traced values of the size symbols
    fingerprint: str
    _merged: dict = dataclasses.field(default_factory=dict)

    def span(self, chain: str, first: int, last: int) -> Optional[Span]:
        """The span of units ``first..last`` of group ``chain`` (cached); None if refused."""
        key = (chain, first, last)
        if key not in self._merged:
            if first == last:
                self._merged[key] = self.unit_spans[f"{chain}#{first}"]
            else:
                g = next(g for g in self.analysis.groups if g.name == chain)
                sp, _ = make_span(self.gm, g, first, last)
                self._merged[key] = sp
        return self._merged[key]


def unit_fingerprint(gm: fx.GraphModule, units: Sequence[str]) -> str:
    """Hash of the op sequence and the unit names — not of the input shapes: a profile is a
    property of the model and its sampler, valid at other batch sizes and resolutions."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        if n.op == "placeholder" and is_param_placeholder(n):
            continue
        h.update(node_signature(n).encode())
    h.update("|".join(units).encode())
    return h.hexdigest()[:32]


def analyze_units(gm: fx.GraphModule, analysis, node_seconds: Optional[dict] = None) -> UnitGraph:
    """Units, single-unit spans, the DAG and the costs of an analysed graph.  The DAG's costs
    (what the plan saves) are FLOPs, or with ``node_seconds`` (``target_cost="measured"``) each
    node's measured eager seconds."""
    nodes = list(gm.graph.nodes)
    units, where, unit_nodes, streams, chains = [], {}, {}, {}, {}
    spans: dict[str, Optional[Span]] = {}
    refused: list[Reason] = []
    for g in analysis.groups:
        for u in g.units:
            name = f"{g.name}#{u.index}"
            units.append(name)
            where[name] = (g, u.index)
            unit_nodes[name] = list(u.nodes)
            streams[name] = list(stream_inputs(g, u.index))
            chains[name] = (g.name, u.index)
            sp, why = make_span(gm, g, u.index, u.index)
            spans[name] = sp
            if sp is None:
                refused.append(why)
    sym = graph_size_symbols(gm, is_param_placeholder)
    dag = unit_dag(nodes, unit_nodes, stream_inputs=streams, chains=chains,
                   cacheable={u: spans[u] is not None for u in units},
                   cost=((lambda ns: float(sum(node_seconds.get(n.name, 0.0) for n in ns))) if node_seconds
                         else (lambda ns: float(sum(node_flops(n) for n in ns)))))
    costs = {u: region_cost(unit_nodes[u], sym, is_param_placeholder) for u in units}
    in_units = {n for ns in unit_nodes.values() for n in ns}
    costs["other"] = region_cost([n for n in nodes if n not in in_units], sym, is_param_placeholder)
    sizes = {s.name: v for s, v in sym.values.items()}
    return UnitGraph(gm, analysis, units, where, spans, refused, dag, costs, sizes, unit_fingerprint(gm, units))
