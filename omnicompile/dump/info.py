"""What the dump and ``omnicache explain`` know about one graph.

:class:`GraphInfo` is analysis data only: the graph, its block lists, units, streams and
spans (the analysis's, or the spans a runtime actually guards), and its estimated FLOPs.  What
the backend *decided* — the policy's description, the guard, cached or not and why — comes
from the graph's :class:`~omnicompile.report.GraphReport`; what it will *do* over a
generation comes from the runtime (:func:`graph_preview`: ``runtime.preview(steps)``, or every
step computed for a graph compiled unchanged).  Nothing here builds a policy or re-simulates
its rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch.fx as fx

from omnicompile.graphs.cost import node_flops
from omnicompile.passes.blocks import BlockAnalysis, find_blocks
from omnicompile.passes.common import Reason
from omnicompile.passes.edit import copy_graph_module
from omnicompile.passes.spans import Span, SpanAnalysis, find_spans
from omnicompile.preview import Preview

__all__ = ["DEFAULT_STEPS", "GraphInfo", "analyze_graph", "graph_preview", "preview_steps", "merged_reasons",
           "policy_text"]

#: steps of one generation when neither the caller nor ``num_steps`` says
DEFAULT_STEPS = 28


@dataclasses.dataclass
class GraphInfo:
    """The analysis of one graph, as the dump's tables and drawings read it."""

    graph_id: int
    gm: fx.GraphModule            # the graph the analysis nodes belong to
    blocks: BlockAnalysis
    analysis: SpanAnalysis
    flops_total: int
    #: the spans the runtime actually guards, when given (a policy may choose its own: the
    #: probe keeps its first blocks outside, the layered plan guards regions of units)
    span_override: Optional[list] = None

    @property
    def spans(self) -> list[Span]:
        return list(self.span_override) if self.span_override is not None else self.analysis.spans

    @property
    def refused(self) -> list[Reason]:
        return list(self.blocks.reasons) + list(self.analysis.refused)

    def unit_of(self) -> dict[fx.Node, tuple[str, int]]:
        return {n: (g.name, u.index) for g in self.analysis.groups for u in g.units for n in u.nodes}

    def span_of_unit(self, group: str, index: int) -> Optional[int]:
        for k, sp in enumerate(self.spans):
            if sp.group == group and sp.first_unit <= index <= sp.last_unit:
                return k
        return None


def _clean_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without ``omni.*`` facts, so that re-running the analysis neither
    sees the backend's facts nor appends to them on Dynamo's nodes."""
    new, _ = copy_graph_module(gm)
    for n in new.graph.nodes:
        n.meta = {k: v for k, v in n.meta.items() if not k.startswith("omni.")}
    return new


def analyze_graph(gm: fx.GraphModule, graph_id: int = 0, *, blocks: Optional[BlockAnalysis] = None,
                  analysis: Optional[SpanAnalysis] = None, spans: Optional[Sequence[Span]] = None) -> GraphInfo:
    """Run (or reuse) the analysis passes on ``gm``.  Without ``blocks``/``analysis`` the
    passes run on a copy: Dynamo's graph is never touched.  ``spans`` (a runtime's
    ``.spans``) replaces the analysis's spans in every table and drawing."""
    if blocks is None or analysis is None:
        gm = _clean_copy(gm)
        blocks = find_blocks(gm)
        analysis = find_spans(gm, blocks)
    flops = sum(node_flops(n) for n in gm.graph.nodes)
    return GraphInfo(graph_id, gm, blocks, analysis, flops, list(spans) if spans is not None else None)


def preview_steps(steps: Optional[int], config: Any = None) -> int:
    """The preview's length: ``steps``, else the config's ``num_steps``, else
    :data:`DEFAULT_STEPS`."""
    if steps:
        return steps
    return (config.num_steps if config is not None else None) or DEFAULT_STEPS


def graph_preview(info: GraphInfo, runtime: Any, steps: int, report: Any = None) -> Preview:
    """What the graph does over one generation of ``steps`` steps: the runtime's own
    :meth:`~omnicompile.runtime.base.Runtime.preview`, or — a graph compiled unchanged, or
    a dump without its runtime — every step computed."""
    if runtime is not None:
        return runtime.preview(steps)
    if report is not None and report.fallback is not None:
        note = f"compiled unchanged [{report.fallback.code}]: every step computes the whole graph"
    elif report is not None and not report.cached:
        note = "compiled unchanged: every step computes the whole graph"
    else:
        note = "no runtime given: every step is shown computed (the dump never simulates a policy)"
    return Preview.computed(steps, info.spans, info.flops_total, note)


def merged_reasons(info: Optional[GraphInfo], report: Any = None) -> list[Reason]:
    """The analysis's refusals, then those only the backend's report has (policy-level
    ones, e.g. an uncalibrated trajectory), without duplicates."""
    out = list(info.refused) if info is not None else []
    for r in (report.refused if report is not None else []):
        if r not in out:
            out.append(r)
    return out


def policy_text(policy: Optional[dict]) -> str:
    """``static interval=2 warmup=2 ...`` from a policy's ``describe()`` (``?`` when unknown)."""
    if not policy:
        return "?"
    rest = " ".join(f"{k}={v}" for k, v in policy.items() if k != "policy")
    return f"{policy.get('policy', '?')}{' ' + rest if rest else ''}"
