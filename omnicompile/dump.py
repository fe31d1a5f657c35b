"""Graph dumps: what the backend saw, what it found, what it plans, what it built.

One function writes the dump of one compiled graph, :func:`write_graph_dump`.  Two callers:

* the backend, when ``dump_dir=`` (or ``OMNICACHE_DUMP_DIR``) is set — from inside a user's
  own pipeline, once per graph Dynamo hands over;
* ``omnicache dump SPEC --out DIR`` (:mod:`omnicompile.cli`), which traces a model and
  runs the backend on each of its graphs.

Files, flat in the dump folder and prefixed ``graph{id}_`` so that several graphs (graph
breaks, recompilations) share one folder::

    index.html                     every graph of the folder, with links (rewritten each time)
    graph0_index.html              one page per graph: summary, images, tables, links
    graph0_before.py / .txt        Dynamo's graph: re-loadable module / print_readable (shapes, source lines)
    graph0_after_variant_RR.py     each rewritten graph the backend compiled (variants or cond), same forms
    graph0_blocks.json             block lists, groups, units, stream links, spans, refusals, inputs
    graph0_costs.csv               per unit: nodes, matmul ops, FLOPs, parameter and stream bytes
    graph0_units.dot               the unit dependency graph (Graphviz text)
    graph0_units.svg | .png        its rendering: ``dot`` when installed, else a matplotlib drawing
    graph0_plan.json / .png        the policy's decisions over N steps (step x unit heatmap)
    graph0_report.md / .json       the backend's report of the graph, when there is one
    graph0_manifest.json           what was written, and what could not be (errors)

**Re-loadable code.**  ``graph*_before.py`` and ``graph*_after_*.py`` are Python modules: the
imports the FX code needs, then ``class Graph(torch.nn.Module)`` whose ``forward`` is the
graph's code (``GraphModule.code``); the ``torch.cond`` branches of a cond graph become
classes of their own.  Tensor constants, if a graph has any, go to ``*.constants.pt``
next to it.  :func:`load_graph` imports such a file and returns the module; called with the
graph's inputs (Dynamo lifts parameters to inputs) it computes what the dumped graph does.

**The unit dependency graph.**  Regions of the graph, in graph order: user inputs, the glue
code before, between and after the block groups (``prologue``, ``glue1``, ``epilogue``),
each cache unit, the output.  An edge says a region reads values of another; *stream*
edges (unit to unit, bold) carry the values a cached span replaces by ``in + residual``,
*side* edges (dashed) carry what every unit reads (temb, rotary tables).  Units are shaded
by the fraction of planned steps that reuse them; each span is a cluster.

**The plan.**  What the runtime would do over ``steps`` steps of one generation: the
policy's ``decide(step, steps, n_spans)``, with the runtime's rule that a span is computed
when it has no cache yet (``F``, forced).  The *ideal speedup* divides the estimated FLOPs
of the generation by the FLOPs left after skipping the reused spans — an upper bound that
ignores elementwise work, the residual adds and dispatch overhead.

Dumping never breaks compilation: :func:`write_graph_dump` catches every error, logs a
warning and records it in the manifest and on the graph's page.  matplotlib draws the PNGs
(the ``viz`` extra); without it the images are skipped with that message.  Graphviz ``dot``
renders the SVG when it is on ``PATH``.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import html
import importlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx

from omnicompile.config import OmniCacheConfig
from omnicompile.errors import OmniCacheError
from omnicompile.graphs.cost import graph_size_symbols, node_flops, region_cost
from omnicompile.passes.blocks import BlockAnalysis, find_blocks
from omnicompile.passes.common import Reason, copy_graph_module, is_heavy, is_param_placeholder, tensor_meta
from omnicompile.passes.spans import Span, SpanAnalysis, find_spans
from omnicompile.policies import Policy, make_policy

log = logging.getLogger("omnicompile")

__all__ = ["DEFAULT_STEPS", "DumpError", "VizUnavailable", "GraphInfo", "Plan", "Region", "Edge",
           "analyze_graph", "plan_for", "block_map", "unit_costs", "unit_graph", "to_dot",
           "render_unit_graph", "draw_plan", "graph_module_source", "load_graph",
           "write_graph_dump", "write_index", "require_matplotlib", "dot_available", "merged_reasons"]

#: steps of one generation when neither the caller nor ``num_steps`` says
DEFAULT_STEPS = 28

RENDERERS = ("auto", "dot", "matplotlib", "none")


class DumpError(OmniCacheError):
    """A dump file cannot be written or re-loaded; the message says which and why."""


class VizUnavailable(DumpError, ImportError):
    """matplotlib is missing (drawing the plan heatmap and the fallback unit graph needs it)."""


def require_matplotlib():
    """Import matplotlib lazily; raise :class:`VizUnavailable` with the fix when missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as e:
        raise VizUnavailable(f"drawing the dump's images needs matplotlib ({e}); "
                             "install it with: pip install 'omnicompile[viz]'") from None
    return matplotlib


def dot_available() -> bool:
    return shutil.which("dot") is not None


# ============================================================================ analysis


@dataclasses.dataclass
class GraphInfo:
    """Everything the dump and ``omnicache explain`` know about one graph."""

    graph_id: int
    gm: fx.GraphModule            # the graph the analysis nodes belong to
    config: OmniCacheConfig
    policy: Policy
    guard: str                    # "variants" or "cond": what the backend builds
    blocks: BlockAnalysis
    analysis: SpanAnalysis
    flops_total: int
    #: the spans the runtime actually rewrote, when they differ from the analysis's
    #: (a policy may plan its own, e.g. the probe keeps its first blocks outside)
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


def analyze_graph(gm: fx.GraphModule, config: Optional[OmniCacheConfig] = None, graph_id: int = 0, *,
                  blocks: Optional[BlockAnalysis] = None, analysis: Optional[SpanAnalysis] = None,
                  policy: Optional[Policy] = None, spans: Optional[Sequence[Span]] = None) -> GraphInfo:
    """Run (or reuse) the analysis passes on ``gm``.  Without ``blocks``/``analysis`` the
    passes run on a copy: Dynamo's graph is never touched.  ``spans`` (a runtime's
    ``.spans``) replaces the analysis's spans in every table, the plan and the drawings."""
    config = config if config is not None else OmniCacheConfig.from_options({})
    policy = policy if policy is not None else make_policy(config)
    if blocks is None or analysis is None:
        gm = _clean_copy(gm)
        blocks = find_blocks(gm)
        analysis = find_spans(gm, blocks)
    guard = config.guard if config.guard != "auto" else ("variants" if policy.static else "cond")
    flops = sum(node_flops(n) for n in gm.graph.nodes)
    return GraphInfo(graph_id, gm, config, policy, guard, blocks, analysis, flops,
                     list(spans) if spans is not None else None)


# ============================================================================ plan


@dataclasses.dataclass
class Plan:
    """The policy's decisions over one generation, as the runtime would apply them.

    States: ``computed``, ``reused``, ``forced`` (reuse asked for, but the span has no
    cache yet: the runtime computes it) and ``dynamic`` (decided at run time on the
    device, e.g. by a probe).  With dynamic steps the ideal speedup is an upper bound
    (every dynamic step counted as reused): ``bound`` is True."""

    steps: int
    spans: list[str]
    span_flops: list[int]
    flops_per_call: int
    decisions: list[list[str]]     # [step][span]
    error: Optional[str] = None    # a note on how far the plan can be trusted

    MARKS = {"computed": "C", "reused": "R", "forced": "F", "dynamic": "?"}

    def marks(self, span: int) -> str:
        return "".join(self.MARKS[row[span]] for row in self.decisions)

    @property
    def bound(self) -> bool:
        return any(d == "dynamic" for row in self.decisions for d in row)

    @property
    def flops_saved(self) -> int:
        return sum(f for row in self.decisions for f, d in zip(self.span_flops, row) if d in ("reused", "dynamic"))

    @property
    def flops_saved_fraction(self) -> float:
        total = self.flops_per_call * self.steps
        return self.flops_saved / total if total else 0.0

    @property
    def ideal_speedup(self) -> float:
        total = self.flops_per_call * self.steps
        left = total - self.flops_saved
        return total / left if total and left > 0 else 1.0

    def reuse_fraction(self, span: int) -> float:
        if not self.decisions:
            return 0.0
        return sum(row[span] in ("reused", "dynamic") for row in self.decisions) / len(self.decisions)

    def to_dict(self) -> dict:
        return {"steps": self.steps, "spans": list(self.spans), "span_flops": list(self.span_flops),
                "flops_per_call": self.flops_per_call,
                "marks": {s: self.marks(k) for k, s in enumerate(self.spans)},
                "decisions": self.decisions, "flops_saved_fraction": self.flops_saved_fraction,
                "ideal_speedup": self.ideal_speedup, "ideal_speedup_is_bound": self.bound, "error": self.error}


def plan_for(info: GraphInfo, steps: Optional[int] = None, cacheable: Optional[bool] = None,
             spans: Optional[Sequence[Span]] = None, runtime: Any = None) -> Plan:
    """Simulate one generation of ``steps`` steps.

    ``cacheable=False`` (the backend compiles the graph unchanged) plans every step as
    computed.  ``spans`` overrides the analysis's spans (a policy may rewrite other spans,
    e.g. the probe keeps its first blocks outside: pass ``runtime.spans``).  A static
    policy is asked ``decide(step, steps, n)``; a run-time policy with a ``force(step,
    num_steps, t, tracker)`` method (steps it always computes) gets ``dynamic`` elsewhere.
    A runtime that derived its schedule from a calibration (``runtime.calibration`` and
    ``runtime.schedule``, the reuse steps: policy ``trajectory``) is planned from it."""
    policy = info.policy
    steps = steps or info.config.num_steps or DEFAULT_STEPS
    spans = list(spans) if spans is not None else info.spans
    names = [s.name for s in spans]
    flops = [s.flops for s in spans]
    n = len(names)
    decisions: list[list[str]] = []
    error = None
    if cacheable is None:
        cacheable = policy.rewrites and bool(spans) and info.analysis.timestep is not None
    force = getattr(policy, "force", None)
    dynamic = cacheable and not policy.static and callable(force)
    schedule = None
    if cacheable and runtime is not None and hasattr(runtime, "schedule") and hasattr(runtime, "calibration"):
        cal = runtime.calibration
        if cal is None:
            error = (f"policy {policy.name!r} is not calibrated yet: every step is computed until a calibration "
                     "runs (option calibrate='first' calibrates on the first generation)")
            cacheable = False
        else:
            schedule = set(runtime.schedule or ())
            n_cal = getattr(cal, "num_steps", steps)
            if n_cal != steps:
                error = f"the calibration is for {n_cal} steps; its schedule is shown over {steps}"
    if cacheable and not policy.static and not dynamic:
        error = f"policy {policy.name!r} decides at run time; this plan is its decide() without runtime signals"
    has_cache = [False] * n
    for step in range(steps):
        want: tuple = (False,) * n
        if dynamic:
            try:
                forced = bool(force(step, steps, None, None))
            except Exception as e:
                error = f"{policy.name}.force: {type(e).__name__}: {e}"
                forced = True
            decisions.append(["computed" if forced or not any(has_cache) and step == 0 else "dynamic"] * n)
            has_cache = [True] * n
            continue
        if schedule is not None:
            want = (step in schedule,) * n
        elif cacheable and n:
            try:
                want = tuple(bool(x) for x in policy.decide(step, steps, n))
            except Exception as e:  # a data-dependent policy may need runtime state
                error = f"{policy.name}.decide: {type(e).__name__}: {e}"
        row = []
        for k in range(n):
            if want[k] and has_cache[k]:
                row.append("reused")
            elif want[k]:
                row.append("forced")     # the runtime computes a span that has no cache yet
                has_cache[k] = True
            else:
                row.append("computed")
                has_cache[k] = True
        decisions.append(row)
    if dynamic and error is None:
        error = (f"policy {policy.name!r} decides at run time ('?' steps); the ideal speedup counts every "
                 "such step as reused: an upper bound")
    return Plan(steps, names, flops, info.flops_total, decisions, error)


# ============================================================================ tables


def _meta_text(node: Any) -> dict:
    tm = tensor_meta(node)
    if tm is None:
        return {"shape": None, "dtype": None}
    shape, dtype, _ = tm
    return {"shape": [d if isinstance(d, int) else str(d) for d in shape], "dtype": str(dtype).replace("torch.", "")}


def _nbytes(node: Any) -> int:
    tm = tensor_meta(node)
    if tm is None:
        return 0
    shape, dtype, _ = tm
    try:
        numel = 1
        for d in shape:
            numel *= int(d)
        return numel * torch.empty((), dtype=dtype).element_size()
    except (TypeError, ValueError, RuntimeError):
        return 0


def block_map(info: GraphInfo) -> dict:
    """The block/stream map of a graph, JSON-ready."""
    nodes = list(info.gm.graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    params = [n for n in ph if is_param_placeholder(n)]
    ts = info.analysis.timestep
    inputs = [{"name": n.name, **_meta_text(n), "timestep": n is ts} for n in ph if not is_param_placeholder(n)]
    lists = []
    for bl in info.blocks.lists:
        lists.append({"name": bl.name, "method": bl.method, "count": len(bl.blocks), "blocks": [
            {"name": b.name, "index": b.index, "nodes": len(b.nodes), "heavy_ops": sum(is_heavy(n) for n in b.nodes),
             "flops": sum(node_flops(n) for n in b.nodes), "first": b.first.name, "last": b.last.name}
            for b in bl.blocks]})
    groups = []
    for g in info.analysis.groups:
        groups.append({
            "name": g.name, "lists": list(g.lists),
            "units": [{"index": u.index, "nodes": len(u.nodes), "flops": sum(node_flops(n) for n in u.nodes),
                       "first": u.nodes[0].name if u.nodes else None, "last": u.nodes[-1].name if u.nodes else None}
                      for u in g.units],
            "links": [[{"unit": i, "input": a.name, "output": b.name, **_meta_text(b)} for a, b in link]
                      for i, link in enumerate(g.links)],
            "last_outputs": [o.name if o is not None else None for o in g.last_outs],
        })
    spans = []
    for k, sp in enumerate(info.spans):
        d = sp.describe()
        d["index"] = k
        d["group"] = sp.group
        d["side_inputs"] = [{"name": n.name, **_meta_text(n)} for n in sp.side_inputs]
        d["keep"] = [n.name for n in sp.keep]
        d["flops_fraction"] = sp.flops / info.flops_total if info.flops_total else 0.0
        spans.append(d)
    return {
        "graph_id": info.graph_id, "nodes": len(nodes), "flops_per_call": info.flops_total,
        "inputs": inputs,
        "parameters": {"count": len(params), "bytes": sum(_nbytes(n) for n in params)},
        "timestep_input": ts.name if ts is not None else None,
        "block_lists": lists, "groups": groups, "spans": spans,
        "refused": [r.to_dict() for r in info.refused],
        "policy": info.policy.describe(), "guard": info.guard,
    }


def unit_costs(info: GraphInfo) -> list[dict]:
    """Per cache unit: size, matmul work, parameter bytes read, stream bytes a per-unit
    cache would hold, and the span (if any) that caches it."""
    rows = []
    try:
        sym = graph_size_symbols(info.gm, is_param_placeholder)
    except Exception as e:            # the formulas are an extra; the numbers stand without them
        log.debug("omnicompile: no size symbols for graph %s: %s", info.graph_id, e)
        sym = None
    for g in info.analysis.groups:
        for u in g.units:
            flops = sum(node_flops(n) for n in u.nodes)
            expr = str(region_cost(u.nodes, sym, is_param_placeholder).flops) if sym is not None else None
            params = {a for n in u.nodes for a in n.all_input_nodes if is_param_placeholder(a)}
            if u.index < len(g.links):
                outs = [b for _, b in g.links[u.index]]
            else:
                outs = [o for o in g.last_outs if o is not None]
            k = info.span_of_unit(g.name, u.index)
            rows.append({
                "group": g.name, "unit": u.index, "name": f"{g.name}#{u.index}", "nodes": len(u.nodes),
                "heavy_ops": sum(is_heavy(n) for n in u.nodes), "flops": flops, "flops_symbolic": expr,
                "flops_fraction": flops / info.flops_total if info.flops_total else 0.0,
                "param_bytes": sum(_nbytes(p) for p in params),
                "stream_bytes": sum(_nbytes(o) for o in outs),
                "span": info.spans[k].name if k is not None else None,
            })
    return rows


# ============================================================================ unit graph


@dataclasses.dataclass
class Region:
    key: str                     # stable id: "input:NAME", "prologue", "glue1", "unit:GROUP#I", "epilogue", "output"
    kind: str                    # "input" | "glue" | "unit" | "output"
    label: str
    nodes: int = 0
    flops: int = 0
    span: Optional[int] = None   # index into info.spans for units of a cached span
    group: Optional[str] = None
    index: Optional[int] = None
    detail: str = ""


@dataclasses.dataclass
class Edge:
    src: str
    dst: str
    kind: str                    # "stream" | "side" | "data"
    values: list[str]
    shape: str = ""


def unit_graph(info: GraphInfo) -> tuple[list[Region], list[Edge]]:
    """Regions (in graph order, which is a topological order) and the edges between them."""
    unit_of = info.unit_of()
    stream_vals: set = set()
    for g in info.analysis.groups:
        for link in g.links:
            for a, b in link:
                stream_vals.add(a)
                stream_vals.add(b)
        stream_vals.update(o for o in g.last_outs if o is not None)
    regions: dict[str, Region] = {}
    region_of: dict[fx.Node, str] = {}
    nodes = list(info.gm.graph.nodes)
    unit_pos = [i for i, n in enumerate(nodes) if n in unit_of]
    first_unit = unit_pos[0] if unit_pos else len(nodes)
    last_unit = unit_pos[-1] if unit_pos else -1
    glue_no = 0
    current: Optional[Region] = None     # the glue run being extended
    for i, n in enumerate(nodes):
        if n.op == "placeholder":
            if not is_param_placeholder(n):
                key = f"input:{n.name}"
                m = _meta_text(n)
                shape = "x".join(map(str, m["shape"])) if m["shape"] is not None else "?"
                detail = f"{shape} {m['dtype'] or ''}" + (" (timestep)" if n is info.analysis.timestep else "")
                regions[key] = Region(key, "input", n.name, detail=detail)
                region_of[n] = key
            continue
        if n.op == "get_attr":
            continue
        if n.op == "output":
            regions["output"] = Region("output", "output", "output")
            region_of[n] = "output"
            continue
        if n in unit_of:
            gname, idx = unit_of[n]
            key = f"unit:{gname}#{idx}"
            r = regions.get(key)
            if r is None:
                r = regions[key] = Region(key, "unit", f"{gname} #{idx}", span=info.span_of_unit(gname, idx),
                                          group=gname, index=idx)
            current = None
        else:
            if current is None:
                if not unit_pos:
                    key = "graph"
                elif i < first_unit:
                    key = "prologue"
                elif i > last_unit:
                    key = "epilogue"
                else:
                    glue_no += 1
                    key = f"glue{glue_no}"
                current = regions.get(key) or regions.setdefault(key, Region(key, "glue", key))
            r = current
        r.nodes += 1
        r.flops += node_flops(n)
        region_of[n] = r.key
    # edges
    acc: dict[tuple[str, str], list[fx.Node]] = {}
    for n in info.gm.graph.nodes:
        dst = region_of.get(n)
        if dst is None or n.op == "placeholder":
            continue
        for a in n.all_input_nodes:
            src = region_of.get(a)
            if src is None or src == dst:
                continue
            vals = acc.setdefault((src, dst), [])
            if a not in vals:
                vals.append(a)
    edges = []
    for (src, dst), vals in acc.items():
        rs, rd = regions[src], regions[dst]
        if rs.kind == "unit" and rd.kind == "unit" and any(v in stream_vals for v in vals):
            kind = "stream"
        elif rd.kind == "unit" and rs.kind != "unit":
            kind = "side"
        else:
            kind = "data"
        m = _meta_text(vals[0])
        shape = ("x".join(map(str, m["shape"])) if m["shape"] is not None else "")
        edges.append(Edge(src, dst, kind, [v.name for v in vals], shape))
    return list(regions.values()), edges   # insertion order = graph order


def _dot_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _mix(frac: float, lo=(0xf7, 0xfb, 0xff), hi=(0x31, 0xa3, 0x54)) -> str:
    c = [round(a + (b - a) * max(0.0, min(1.0, frac))) for a, b in zip(lo, hi)]
    return "#%02x%02x%02x" % tuple(c)


_KIND_FILL = {"input": "#eeeeee", "glue": "#fff7dc", "output": "#eeeeee"}


def _region_label(r: Region, plan: Optional[Plan]) -> str:
    if r.kind == "input":
        return f"{r.label}\n{r.detail}"
    if r.kind == "output":
        return "output"
    text = f"{r.label}\n{r.nodes} nodes, {r.flops / 1e6:.3g} MFLOP"
    if r.kind == "unit":
        if r.span is None:
            text += "\nnot in a cached span"
        elif plan is not None and plan.decisions:
            text += f"\nreused {'up to ' if plan.bound else ''}{plan.reuse_fraction(r.span):.0%} of steps"
    return text


def _region_fill(r: Region, plan: Optional[Plan]) -> str:
    if r.kind != "unit":
        return _KIND_FILL.get(r.kind, "#ffffff")
    if r.span is None:
        return "#d9d9d9"
    return _mix(plan.reuse_fraction(r.span) if plan is not None else 0.0)


def _edge_label(e: Edge) -> str:
    names = ", ".join(e.values[:2]) + (f" +{len(e.values) - 2}" if len(e.values) > 2 else "")
    return f"{names}\n{e.shape}" if e.shape else names


def to_dot(info: GraphInfo, regions: Sequence[Region], edges: Sequence[Edge], plan: Optional[Plan] = None) -> str:
    """Graphviz text of the unit dependency graph."""
    title = f"graph {info.graph_id}: {len(info.spans)} cached span(s), policy {_policy_text(info.policy.describe())}"
    if plan is not None:
        title += f", ideal speedup {'at most ' if plan.bound else ''}{plan.ideal_speedup:.2f}x over {plan.steps} steps"
    out = [f"digraph {_dot_str(f'graph{info.graph_id}')} {{",
           f"  label={_dot_str(title)}; labelloc=t; rankdir=TB; newrank=true;",
           '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=8, color="#555555"];']

    def node_line(r: Region, indent: str = "  ") -> str:
        shape = ', shape=ellipse' if r.kind in ("input", "output") else ""
        return (f"{indent}{_dot_str(r.key)} [label={_dot_str(_region_label(r, plan))}, "
                f"fillcolor={_dot_str(_region_fill(r, plan))}{shape}];")

    in_cluster = {k: [r for r in regions if r.kind == "unit" and r.span == k] for k in range(len(info.spans))}
    for r in regions:
        if not (r.kind == "unit" and r.span is not None):
            out.append(node_line(r))
    for k, members in in_cluster.items():
        if not members:
            continue
        sp = info.spans[k]
        lab = f"span {sp.name}"
        if plan is not None and plan.decisions:
            lab += f": reused {'up to ' if plan.bound else ''}{plan.reuse_fraction(k):.0%} of {plan.steps} steps"
        out.append(f"  subgraph {_dot_str(f'cluster_span{k}')} {{")
        out.append(f'    label={_dot_str(lab)}; style="rounded,dashed"; color="#31a354"; fontname="Helvetica";')
        out.extend(node_line(r, "    ") for r in members)
        out.append("  }")
    for e in edges:
        attrs = [f"label={_dot_str(_edge_label(e))}"]
        if e.kind == "stream":
            attrs.append('penwidth=2.2, color="#08519c"')
        elif e.kind == "side":
            attrs.append('style=dashed, color="#969696"')
        out.append(f"  {_dot_str(e.src)} -> {_dot_str(e.dst)} [{', '.join(attrs)}];")
    out.append("}")
    return "\n".join(out) + "\n"


def _layout(regions: Sequence[Region], edges: Sequence[Edge]) -> dict[str, tuple[float, int]]:
    """A layered layout: rank = longest path from the inputs (regions come in topological
    order), positions within a rank by the mean position of their predecessors."""
    preds: dict[str, list[str]] = {r.key: [] for r in regions}
    for e in edges:
        preds[e.dst].append(e.src)
    rank: dict[str, int] = {}
    for r in regions:
        ps = [rank[p] for p in preds[r.key] if p in rank]
        rank[r.key] = (max(ps) + 1) if ps else 0
    by_rank: dict[int, list[str]] = {}
    for r in regions:
        by_rank.setdefault(rank[r.key], []).append(r.key)
    pos: dict[str, tuple[float, int]] = {}
    for k in sorted(by_rank):
        keys = by_rank[k]
        def bary(key):
            ps = [pos[p][0] for p in preds[key] if p in pos]
            return sum(ps) / len(ps) if ps else 0.0
        if k > 0:
            keys.sort(key=bary)
        width = len(keys)
        for i, key in enumerate(keys):
            pos[key] = (i - (width - 1) / 2.0, k)
    return pos


def _draw_unit_graph_png(info: GraphInfo, regions: Sequence[Region], edges: Sequence[Edge], path: Path,
                         plan: Optional[Plan]) -> None:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pos = _layout(regions, edges)
    ranks = max(p[1] for p in pos.values()) + 1
    per_rank = max(sum(1 for p in pos.values() if p[1] == k) for k in range(ranks))
    w = max(6.0, 2.4 * per_rank + 1.5)
    h = min(max(3.0, 1.05 * ranks + 1.0), 160.0)
    fig = Figure(figsize=(w, h), dpi=72 if h > 60 else 90)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.01, 0.98, 0.95))
    ax.set_axis_off()
    ax.set_xlim(-per_rank / 2.0 - 0.6, per_rank / 2.0 + 0.6)
    ax.set_ylim(-(ranks - 0.4), 0.6)
    xy = {k: (x * 1.0, -float(r)) for k, (x, r) in pos.items()}
    for e in edges:
        (x0, y0), (x1, y1) = xy[e.src], xy[e.dst]
        if e.kind == "stream":
            style = dict(arrowstyle="-|>", color="#08519c", lw=2.0)
        elif e.kind == "side":
            style = dict(arrowstyle="-|>", color="#969696", lw=0.7, linestyle="--",
                         connectionstyle="arc3,rad=0.25" if abs(y1 - y0) > 1.5 else "arc3")
        else:
            style = dict(arrowstyle="-|>", color="#555555", lw=1.0)
        ax.annotate("", xy=(x1, y1 + 0.22), xytext=(x0, y0 - 0.22), arrowprops=dict(shrinkA=0, shrinkB=0, **style))
        if e.kind == "stream":
            ax.text((x0 + x1) / 2 + 0.05, (y0 + y1) / 2, ", ".join(e.values[:2]), fontsize=6, color="#08519c",
                    ha="left", va="center")
    for r in regions:
        x, y = xy[r.key]
        box = "round,pad=0.3" if r.kind not in ("input", "output") else "round4,pad=0.3"
        ax.text(x, y, _region_label(r, plan), ha="center", va="center", fontsize=7,
                bbox=dict(boxstyle=box, fc=_region_fill(r, plan), ec="#31a354" if r.span is not None else "#444444",
                          lw=1.4 if r.span is not None else 0.8))
    title = f"graph {info.graph_id}: units and their dependencies"
    if plan is not None:
        title += f" (shade: fraction of {plan.steps} steps reused)"
    ax.set_title(title, fontsize=9)
    fig.savefig(str(path), format="png")


def render_unit_graph(info: GraphInfo, dot_text: str, regions: Sequence[Region], edges: Sequence[Edge],
                      stem: Path, renderer: str = "auto", plan: Optional[Plan] = None) -> Optional[Path]:
    """Render the unit graph next to ``stem``: ``stem.svg`` through Graphviz ``dot``
    (``renderer="dot"``, or ``"auto"`` when ``dot`` is installed), else ``stem.png``
    drawn with matplotlib.  ``"none"`` renders nothing."""
    if renderer not in RENDERERS:
        raise DumpError(f"renderer {renderer!r}: allowed {', '.join(RENDERERS)}")
    if renderer == "none":
        return None
    if renderer == "dot" or (renderer == "auto" and dot_available()):
        exe = shutil.which("dot")
        if exe is None:
            raise DumpError("renderer 'dot' needs Graphviz's dot on PATH (e.g. apt-get install graphviz); "
                            "use renderer 'matplotlib' or 'auto'")
        out = stem.with_suffix(".svg")
        try:
            subprocess.run([exe, "-Tsvg", "-o", str(out)], input=dot_text.encode(), check=True,
                           capture_output=True, timeout=120)
            return out
        except (subprocess.SubprocessError, OSError) as e:
            if renderer == "dot":
                raise DumpError(f"dot failed: {e}") from None
            log.warning("omnicache dump: dot failed (%s); drawing with matplotlib", e)
    out = stem.with_suffix(".png")
    _draw_unit_graph_png(info, regions, edges, out, plan)
    return out


# ============================================================================ plan heatmap

_PLAN_COLORS = {"computed": "#9ecae1", "reused": "#31a354", "forced": "#fd8d3c", "dynamic": "#fee391",
                "uncached": "#d9d9d9"}
_PLAN_LABELS = {"forced": "forced compute (no cache yet)", "dynamic": "decided at run time",
                "uncached": "not in a cached span"}


def draw_plan(info: GraphInfo, plan: Plan, path: Path) -> Path:
    """The plan as a step x unit heatmap (PNG).  Units come from the analysis's groups; a
    unit belongs to the plan's span of the same name range, else it is 'not cacheable'."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    units = [(g.name, u.index) for g in info.analysis.groups for u in g.units]
    states = list(_PLAN_COLORS)
    code = {s: i for i, s in enumerate(states)}
    grid = []
    for row in plan.decisions:
        line = []
        for gname, idx in units:
            k = info.span_of_unit(gname, idx)
            line.append(code["uncached"] if k is None else code[row[k]])
        grid.append(line)
    n_units = max(len(units), 1)
    w = min(max(6.0, 0.22 * n_units + 3.0), 60.0)
    h = min(max(3.5, 0.2 * plan.steps + 2.2), 40.0)
    fig = Figure(figsize=(w, h), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap([_PLAN_COLORS[s] for s in states])
    if units:
        ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(states) - 0.5, interpolation="nearest")
        every = max(1, len(units) // 60)
        ax.set_xticks(range(0, len(units), every))
        ax.set_xticklabels([f"{g}#{i}" for g, i in units][::every], rotation=90, fontsize=6)
        prev = None
        for x, (g, _) in enumerate(units):
            if prev is not None and g != prev:
                ax.axvline(x - 0.5, color="black", lw=0.8)
            prev = g
    else:
        ax.text(0.5, 0.5, "no cache units in this graph", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    every = max(1, plan.steps // 30)
    ax.set_yticks(range(0, plan.steps, every))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_ylabel("denoising step")
    ax.set_xlabel("cache unit")
    ax.set_title(f"graph {info.graph_id}: plan of policy {_policy_text(info.policy.describe())}\n"
                 f"ideal speedup {'at most ' if plan.bound else ''}{plan.ideal_speedup:.2f}x over {plan.steps} steps",
                 fontsize=9)
    ax.legend(handles=[Patch(color=_PLAN_COLORS[s], label=_PLAN_LABELS.get(s, s)) for s in states],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.savefig(str(path), format="png", bbox_inches="tight")
    return path


# ============================================================================ re-loadable code


def _ident(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if s and not s[0].isdigit() else "_" + s


def _import_line(name: str, obj: Any) -> str:
    from torch.fx.graph import _custom_builtins

    if name in _custom_builtins:
        return _custom_builtins[name].import_str
    if isinstance(obj, type(torch)):  # a module
        mod = obj.__name__
        return f"import {mod}" if mod == name else f"import {mod} as {name}"
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if mod and qual and "." not in qual and "<" not in qual:
        try:
            if getattr(importlib.import_module(mod), qual) is obj:
                return f"from {mod} import {qual}" + ("" if qual == name else f" as {name}")
        except Exception:
            pass
    raise DumpError(f"the graph's code uses {name} = {obj!r}, which cannot be imported by name")


def graph_module_source(gm: fx.GraphModule, header: str = "", class_name: str = "Graph"
                        ) -> tuple[str, dict[str, torch.Tensor]]:
    """Python source of a module that re-creates ``gm``, and the tensor constants it loads.

    Raises :class:`DumpError` when the graph uses something that cannot be written as code
    (a non-FX submodule, a global that is not importable by name)."""
    imports: dict[str, None] = {"import torch": None}
    classes: list[str] = []
    constants: dict[str, torch.Tensor] = {}

    def emit(mod: fx.GraphModule, cls: str) -> None:
        pc = mod.graph.python_code(root_module="self")
        for name, obj in pc.globals.items():
            imports.setdefault(_import_line(name, obj), None)
        init = ["    def __init__(self, constants=None):", "        super().__init__()",
                "        constants = constants or {}"]
        for cname, child in mod.named_children():
            if not isinstance(child, fx.GraphModule):
                raise DumpError(f"submodule {cname!r} is a {type(child).__name__}, not an FX GraphModule")
            sub = f"{cls}_{_ident(cname)}"
            emit(child, sub)
            init.append(f"        self.{cname} = {sub}(constants)")
        own: dict[str, torch.Tensor] = {}
        for pname, p in mod.named_parameters(recurse=False):
            own[pname] = p
        for bname, b in mod.named_buffers(recurse=False):
            own[bname] = b
        for n in mod.graph.nodes:
            if n.op == "get_attr" and "." not in n.target:
                v = getattr(mod, n.target, None)
                if isinstance(v, torch.Tensor):
                    own[n.target] = v
            elif n.op == "get_attr" and isinstance(_resolve_attr(mod, n.target), torch.Tensor):
                raise DumpError(f"get_attr {n.target!r} reads a tensor inside a submodule; not supported")
        for aname, t in own.items():
            key = f"{cls}.{aname}"
            constants[key] = t.detach().cpu().clone()
            init.append(f"        self.register_buffer({aname!r}, constants[{key!r}])")
        body = "\n".join("    " + line if line.strip() else "" for line in pc.src.strip("\n").splitlines())
        classes.append(f"class {cls}(torch.nn.Module):\n" + "\n".join(init) + "\n\n" + body + "\n")

    emit(gm, class_name)
    text = header + "\n".join(imports) + "\n\n\n" + "\n\n".join(classes)
    compile(text, "<omnicache dump>", "exec")  # never write a file that does not parse
    return text, constants


def _resolve_attr(mod: torch.nn.Module, target: str):
    cur: Any = mod
    for part in target.split("."):
        cur = getattr(cur, part, None)
        if cur is None:
            return None
    return cur


def load_graph(path: str | os.PathLike) -> torch.nn.Module:
    """Re-load a dumped graph (``graph*_before.py`` / ``graph*_after_*.py``) as a module.

    Call the result with the graph's inputs in placeholder order (after-graphs take the
    residuals, and for cond the predicates, after the original inputs: see the file's header)."""
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"{path}: no such dump file")
    name = "omnicache_dump_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DumpError(f"{path}: not a Python file")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    err = getattr(mod, "RELOAD_ERROR", None)
    if err:
        raise DumpError(f"{path}: this graph was dumped as text only: {err}")
    if not hasattr(mod, "Graph"):
        raise DumpError(f"{path}: no Graph class (not an omnicache graph dump)")
    consts_path = path.with_suffix(".constants.pt")
    consts = torch.load(consts_path, weights_only=True) if consts_path.is_file() else {}
    return mod.Graph(consts)


def _code_header(gid: int, what: str, info: Optional[GraphInfo], signature: str) -> str:
    lines = [f"# omnicache dump: graph {gid}, {what}",
             f"# written {datetime.datetime.now().isoformat(timespec='seconds')} by omnicompile.dump"]
    if info is not None:
        lines.append(f"# policy {_policy_text(info.policy.describe())}, guard {info.guard}")
    lines += [f"# signature: {signature}",
              "# re-load: omnicompile.dump.load_graph(this_file) -> torch.nn.Module; parameters are",
              "# inputs (Dynamo lifts them to placeholders), in the order of forward's arguments.", "", ""]
    return "\n".join(lines)


def _write_code(folder: Path, stem: str, gm: fx.GraphModule, header: str) -> dict:
    """Write ``stem.py`` (re-loadable) and ``stem.txt`` (print_readable).  Returns the
    manifest entry."""
    entry: dict[str, Any] = {"py": f"{stem}.py", "txt": None, "reloadable": True}
    try:
        text, consts = graph_module_source(gm, header)
        if consts:
            torch.save(consts, folder / f"{stem}.constants.pt")
            entry["constants"] = f"{stem}.constants.pt"
    except DumpError as e:
        return {**_write_code_text(folder, stem, gm.code, header, str(e)), **_write_readable(folder, stem, gm)}
    (folder / f"{stem}.py").write_text(text)
    entry.update(_write_readable(folder, stem, gm))
    return entry


def _write_code_text(folder: Path, stem: str, code: str, header: str, why: str) -> dict:
    """A dump file for code that cannot be re-loaded: the code as comments, and why."""
    body = "\n".join("# " + line for line in code.splitlines())
    (folder / f"{stem}.py").write_text(header + f"RELOAD_ERROR = {why!r}\n\n# the graph's code, for reading:\n"
                                       + body + "\n")
    return {"py": f"{stem}.py", "txt": None, "reloadable": False, "reload_error": why}


def _write_readable(folder: Path, stem: str, gm: fx.GraphModule) -> dict:
    try:
        readable = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    except Exception as e:  # print_readable walks fake tensors' metadata: tolerate odd graphs
        readable = f"# print_readable failed: {type(e).__name__}: {e}\n{gm.code}"
    (folder / f"{stem}.txt").write_text(readable)
    return {"txt": f"{stem}.txt"}


# ============================================================================ the dump


def _variant_decision(name: str) -> Optional[tuple[bool, ...]]:
    m = re.fullmatch(r"variant_([CR]*)", name)
    return tuple(c == "R" for c in m.group(1)) if m else None


def _after_graphs(info: GraphInfo, runtime: Any, report: Any) -> list[tuple[str, Callable[[], Any], str]]:
    """(name, builder, signature) of each rewritten graph to dump.  A builder returns the
    GraphModule, or only its code (str) where the graph cannot be had again.

    With a runtime, its ``dumps`` name the graphs it compiled: ``variant_<C|R per span>``
    and ``cond`` are rebuilt with the same pure rewrite passes; other names (a policy's own
    graph) come from ``runtime.graphs[name]`` when the runtime keeps them, from the eager
    inner backend's bound ``forward``, from the policy's ``build_graph(gm, runtime.plan)``,
    or as code text."""
    from omnicompile.passes.rewrite import build_cond, build_variant

    if runtime is not None:
        names = list(getattr(runtime, "dumps", {}) or {})
        spans = list(runtime.spans)
        gm = runtime.gm
    elif report is not None and not report.cached:
        return []
    elif not (info.policy.rewrites and info.spans and info.analysis.timestep is not None):
        return []
    else:
        spans, gm = info.spans, info.gm
        if info.guard == "variants":
            names = ["variant_" + "".join("R" if d else "C" for d in dec) for dec in info.policy.variants(len(spans))]
        else:
            names = ["cond"]
    out = []
    for name in names:
        dec = _variant_decision(name)
        if dec is not None:
            reused = [sp.name for sp, d in zip(spans, dec) if d]
            computed = [sp.name for sp, d in zip(spans, dec) if not d]
            sig = (f"(*inputs, *residuals of {reused or 'no span'}) -> "
                   f"(*outputs, *residuals of {computed or 'no span'}); residuals: live streams, span by span")
            out.append((name, lambda dec=dec: build_variant(gm, spans, dec), sig))
        elif name == "cond":
            sig = "(*inputs, *predicates (True = reuse) per span, *residuals of every span) -> (*outputs, *residuals)"
            out.append((name, lambda: build_cond(gm, spans), sig))
        elif runtime is not None:
            sig = f"see {type(runtime).__name__} (omnicompile.runtime) for the inputs and outputs it appends"
            kept = (getattr(runtime, "graphs", None) or {}).get(name)
            bound = getattr((getattr(runtime, "compiled", None) or {}).get(name), "__self__", None)
            policy = getattr(runtime, "policy", None)
            if isinstance(kept, fx.GraphModule):
                out.append((name, lambda g=kept: g, sig))
            elif isinstance(bound, fx.GraphModule):
                out.append((name, lambda g=bound: g, sig))
            elif callable(getattr(policy, "build_graph", None)) and hasattr(runtime, "plan"):
                out.append((name, lambda: policy.build_graph(runtime.gm, runtime.plan), sig))
            else:
                out.append((name, lambda c=runtime.dumps[name]: c, sig))
    return out


def write_graph_dump(dump_dir: str | os.PathLike, graph_id: int, gm: fx.GraphModule, report: Any = None,
                     runtime: Any = None, *, config: Optional[OmniCacheConfig] = None,
                     blocks: Optional[BlockAnalysis] = None, analysis: Optional[SpanAnalysis] = None,
                     steps: Optional[int] = None, renderer: str = "auto", images: bool = True) -> dict:
    """Write the full dump of one graph into ``dump_dir`` and refresh ``index.html``.

    ``gm`` is Dynamo's graph as the backend received it; ``report`` its
    :class:`~omnicompile.report.GraphReport` (optional); ``runtime`` the
    :class:`~omnicompile.runtime.GraphRuntime` when the graph was rewritten (its variant
    names decide which rewritten graphs are dumped); ``blocks``/``analysis`` the backend's
    analysis results (recomputed on a copy when missing).  ``steps`` sets the plan's length
    (default ``num_steps`` or :data:`DEFAULT_STEPS`).  Never raises: errors are logged and
    listed in the returned manifest (also written as ``graph{id}_manifest.json``)."""
    folder = Path(dump_dir)
    p = f"graph{graph_id}_"
    manifest: dict[str, Any] = {"graph_id": graph_id, "files": {}, "code": {}, "errors": [],
                                "written": datetime.datetime.now().isoformat(timespec="seconds")}
    errors: list[str] = manifest["errors"]

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except VizUnavailable as e:
            errors.append(f"{what}: {e}")
            log.warning("omnicache dump: %s skipped: %s", what, e)
        except Exception as e:
            errors.append(f"{what}: {type(e).__name__}: {e}")
            log.warning("omnicache dump: graph %s: %s failed: %s: %s", graph_id, what, type(e).__name__, e)
        return None

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("omnicache dump: cannot create %s: %s", folder, e)
        manifest["errors"].append(f"cannot create {folder}: {e}")
        return manifest
    if config is None:
        config = getattr(runtime, "config", None)
    if config is None:
        config = attempt("config", lambda: OmniCacheConfig.from_options({})) or None
    # before: always first, so that a crash later still leaves Dynamo's graph on disk
    manifest["code"]["before"] = attempt("before graph", lambda: _write_code(
        folder, p + "before", gm, _code_header(graph_id, "before the rewrite (Dynamo's graph)", None,
                                               "(*inputs) -> outputs, as Dynamo calls the graph")))
    policy = getattr(runtime, "policy", None)
    info = attempt("analysis", lambda: analyze_graph(gm, config, graph_id, blocks=blocks, analysis=analysis,
                                                     policy=policy, spans=getattr(runtime, "spans", None)))
    plan = None
    if info is not None:
        cacheable = bool(report.cached) if report is not None else None
        plan = attempt("plan", lambda: plan_for(info, steps, cacheable=cacheable, runtime=runtime))
        bm = attempt("block map", lambda: block_map(info))
        if bm is not None:
            if report is not None:
                bm["cached"] = bool(report.cached)
                bm["fallback"] = report.fallback.to_dict() if report.fallback else None
            _write_json(folder / f"{p}blocks.json", bm)
            manifest["files"]["blocks"] = f"{p}blocks.json"
            manifest["block_map"] = {k: bm[k] for k in ("nodes", "flops_per_call", "timestep_input")}
            manifest["spans"] = [s["name"] for s in bm["spans"]]
        costs = attempt("unit costs", lambda: unit_costs(info))
        if costs is not None:
            _write_csv(folder / f"{p}costs.csv", costs)
            manifest["files"]["costs"] = f"{p}costs.csv"
            manifest["costs"] = costs
        for name, build, sig in attempt("rewritten graphs", lambda: _after_graphs(info, runtime, report)) or []:
            def one(name=name, build=build, sig=sig):
                g = build()
                header = _code_header(graph_id, f"after the rewrite ({name})", info, sig)
                if isinstance(g, str):
                    return _write_code_text(folder, f"{p}after_{name}", g, header,
                                            "only the code of this graph is available")
                return _write_code(folder, f"{p}after_{name}", g, header)
            manifest["code"][f"after_{name}"] = attempt(f"rewritten graph {name}", one)
        if plan is not None:
            _write_json(folder / f"{p}plan.json", plan.to_dict())
            manifest["files"]["plan"] = f"{p}plan.json"
            manifest["plan"] = {"steps": plan.steps, "ideal_speedup": plan.ideal_speedup, "bound": plan.bound,
                                "marks": {s: plan.marks(k) for k, s in enumerate(plan.spans)}, "error": plan.error}
        ug = attempt("unit graph", lambda: unit_graph(info))
        if ug is not None:
            regions, edges = ug
            dot_text = to_dot(info, regions, edges, plan)
            (folder / f"{p}units.dot").write_text(dot_text)
            manifest["files"]["units_dot"] = f"{p}units.dot"
            if images:
                out = attempt("unit graph rendering",
                              lambda: render_unit_graph(info, dot_text, regions, edges, folder / f"{p}units",
                                                        renderer, plan))
                if out is not None:
                    manifest["files"]["units_image"] = out.name
        if images and plan is not None:
            out = attempt("plan heatmap", lambda: draw_plan(info, plan, folder / f"{p}plan.png"))
            if out is not None:
                manifest["files"]["plan_image"] = out.name
    if report is not None:
        from omnicompile.report import Report

        def reports():
            (folder / f"{p}report.md").write_text(Report([report]).to_markdown())
            (folder / f"{p}report.json").write_text(Report([report]).to_json())
            return True
        if attempt("report", reports):
            manifest["files"]["report_md"] = f"{p}report.md"
            manifest["files"]["report_json"] = f"{p}report.json"
        manifest["cached"] = bool(report.cached)
        manifest["fallback"] = report.fallback.to_dict() if report.fallback else None
    manifest["refused"] = [r.to_dict() for r in merged_reasons(info, report)]
    manifest["policy"] = _policy_text(info.policy.describe()) if info is not None else None
    manifest["guard"] = info.guard if info is not None else None
    manifest["files"]["page"] = f"{p}index.html"
    manifest["files"]["manifest"] = f"{p}manifest.json"
    attempt("graph page", lambda: (folder / f"{p}index.html").write_text(_graph_page(manifest, info)))
    attempt("manifest", lambda: _write_json(folder / f"{p}manifest.json", manifest))
    attempt("index", lambda: write_index(folder))
    return manifest


def merged_reasons(info: Optional[GraphInfo], report: Any = None) -> list[Reason]:
    """The analysis's refusals, then those only the backend's report has (policy-level
    ones, e.g. an uncalibrated trajectory), without duplicates."""
    out = list(info.refused) if info is not None else []
    for r in getattr(report, "refused", None) or []:
        if r not in out:
            out.append(r)
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    path.write_text(buf.getvalue())


def _policy_text(policy: dict) -> str:
    rest = " ".join(f"{k}={v}" for k, v in policy.items() if k != "policy")
    return f"{policy.get('policy', '?')}{' ' + rest if rest else ''}"


# ============================================================================ HTML

_CSS = """body{font-family:system-ui,Helvetica,Arial,sans-serif;margin:1.5em 2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;
text-align:left}th{background:#f3f3f3}code{background:#f5f5f5;padding:0 3px}.bad{color:#a50f15}
.ok{color:#006d2c}img{max-width:100%;border:1px solid #ddd;margin:.4em 0}h2{margin-top:1.4em}"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _link(name: Optional[str], text: Optional[str] = None) -> str:
    return f'<a href="{_e(name)}">{_e(text or name)}</a>' if name else "-"


def _graph_page(m: dict, info: Optional[GraphInfo]) -> str:
    gid = m["graph_id"]
    files = m["files"]
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>omnicache graph {gid}</title>",
           f"<style>{_CSS}</style></head><body>", '<p><a href="index.html">&larr; all graphs</a></p>',
           f"<h1>graph {gid}</h1>"]
    if "cached" in m:
        if m["cached"]:
            out.append(f"<p class='ok'>cached (guard <code>{_e(m.get('guard'))}</code>)</p>")
        else:
            fb = m.get("fallback") or {}
            out.append(f"<p class='bad'>compiled unchanged: <code>{_e(fb.get('code'))}</code> "
                       f"{_e(fb.get('subject', ''))} {_e(fb.get('message', ''))}</p>")
    if m.get("policy"):
        out.append(f"<p>policy <code>{_e(m['policy'])}</code></p>")
    bm = m.get("block_map")
    if bm:
        out.append(f"<p>{bm['nodes']} nodes, {bm['flops_per_call'] / 1e6:.3f} MFLOP per call (estimated), "
                   f"timestep input <code>{_e(bm['timestep_input'])}</code></p>")
    plan = m.get("plan")
    if plan:
        bound = "at most " if plan.get("bound") else ""
        out.append(f"<p>plan over {plan['steps']} steps: ideal speedup {bound}<b>{plan['ideal_speedup']:.2f}x</b> "
                   "(estimated FLOPs of the generation / FLOPs left)</p>")
        if plan.get("error"):
            out.append(f"<p>{_e(plan['error'])}</p>")
        out.append("<table><tr><th>span</th><th>plan (C computed, R reused, F forced compute, "
                   "? decided at run time)</th></tr>")
        out += [f"<tr><td><code>{_e(s)}</code></td><td><code>{_e(mk)}</code></td></tr>"
                for s, mk in plan["marks"].items()]
        out.append("</table>")
    if m["errors"]:
        out.append("<h2>not written</h2><ul>" + "".join(f"<li class='bad'>{_e(e)}</li>" for e in m["errors"])
                   + "</ul>")
    if files.get("plan_image"):
        out.append(f"<h2>plan: step &times; unit</h2><img src='{_e(files['plan_image'])}' alt='plan heatmap'>")
    if files.get("units_image"):
        out.append(f"<h2>unit dependency graph</h2><p>{_link(files.get('units_dot'), 'Graphviz source')}</p>"
                   f"<img src='{_e(files['units_image'])}' alt='unit graph'>")
    if info is not None:
        if info.blocks.lists:
            out.append("<h2>block lists</h2><table><tr><th>name</th><th>blocks</th><th>found by</th>"
                       "<th>nodes per block</th></tr>")
            for bl in info.blocks.lists:
                npb = sorted({len(b.nodes) for b in bl.blocks})
                out.append(f"<tr><td><code>{_e(bl.name)}</code></td><td>{len(bl.blocks)}</td><td>{_e(bl.method)}"
                           f"</td><td>{_e(', '.join(map(str, npb)))}</td></tr>")
            out.append("</table>")
        if info.spans:
            out.append("<h2>cached spans</h2><table><tr><th>span</th><th>units</th><th>streams</th>"
                       "<th>side inputs</th><th>MFLOP</th></tr>")
            for sp in info.spans:
                streams = ", ".join(f"{s.name} {list(s.shape)}" for s in sp.live_streams)
                out.append(f"<tr><td><code>{_e(sp.name)}</code></td><td>{sp.last_unit - sp.first_unit + 1}</td>"
                           f"<td>{_e(streams)}</td><td>{_e(', '.join(n.name for n in sp.side_inputs) or '-')}</td>"
                           f"<td>{sp.flops / 1e6:.3f}</td></tr>")
            out.append("</table>")
    if m.get("refused"):
        out.append("<h2>not cached, and why</h2><ul>" + "".join(
            f"<li><code>{_e(r['code'])}</code> {_e(r.get('subject', ''))}: {_e(r['message'])}</li>"
            for r in m["refused"]) + "</ul>")
    costs = m.get("costs") or []
    if costs:
        out.append("<h2>per-unit costs</h2><p>" + _link(files.get("costs"), "CSV") + "</p><table><tr>" +
                   "".join(f"<th>{_e(k)}</th>" for k in costs[0]) + "</tr>")
        for row in costs[:500]:
            out.append("<tr>" + "".join(f"<td>{_e(f'{v:.3f}' if isinstance(v, float) else v)}</td>"
                                        for v in row.values()) + "</tr>")
        out.append("</table>")
    out.append("<h2>files</h2><table><tr><th>what</th><th>file</th></tr>")
    for key, entry in m["code"].items():
        if not entry:
            continue
        note = "" if entry.get("reloadable") else f" (text only: {entry.get('reload_error')})"
        out.append(f"<tr><td>graph {_e(key)}{_e(note)}</td><td>{_link(entry['py'])} &middot; "
                   f"{_link(entry.get('txt'), 'readable, with shapes')}</td></tr>")
    labels = {"blocks": "block / stream map (JSON)", "costs": "per-unit costs (CSV)", "plan": "plan (JSON)",
              "plan_image": "plan heatmap", "units_dot": "unit graph (Graphviz)", "units_image": "unit graph image",
              "report_md": "report (Markdown)", "report_json": "report (JSON)", "manifest": "manifest (JSON)"}
    for key, label in labels.items():
        if files.get(key):
            out.append(f"<tr><td>{_e(label)}</td><td>{_link(files[key])}</td></tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"


def write_index(dump_dir: str | os.PathLike) -> Path:
    """(Re)write ``index.html`` listing every ``graph*_manifest.json`` of the folder."""
    folder = Path(dump_dir)
    manifests = []
    for f in folder.glob("graph*_manifest.json"):
        try:
            manifests.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    manifests.sort(key=lambda m: m.get("graph_id", 0))
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>omnicache dump</title>",
           f"<style>{_CSS}</style></head><body><h1>omnicache dump</h1>",
           f"<p>{len(manifests)} graph(s) in <code>{_e(folder.resolve())}</code></p>",
           "<table><tr><th>graph</th><th>status</th><th>nodes</th><th>spans</th><th>policy</th>"
           "<th>ideal speedup</th><th>plan</th><th>unit graph</th><th>code</th><th>errors</th></tr>"]
    for m in manifests:
        files = m.get("files", {})
        if "cached" not in m:
            status = "-"
        elif m["cached"]:
            status = "<span class='ok'>cached</span>"
        else:
            status = f"<span class='bad'>unchanged: {_e((m.get('fallback') or {}).get('code'))}</span>"
        plan = m.get("plan") or {}
        code = " ".join(_link(e["py"], k) for k, e in (m.get("code") or {}).items() if e)
        out.append(
            f"<tr><td>{_link(files.get('page'), str(m.get('graph_id')))}</td><td>{status}</td>"
            f"<td>{(m.get('block_map') or {}).get('nodes', '-')}</td>"
            f"<td>{_e(', '.join(m.get('spans', [])) or '-')}</td><td><code>{_e(m.get('policy') or '-')}</code></td>"
            f"<td>{'&le; ' if plan.get('bound') else ''}{plan.get('ideal_speedup', 1.0):.2f}x</td><td>{_link(files.get('plan_image'), 'heatmap')}</td>"
            f"<td>{_link(files.get('units_image'), 'image')} {_link(files.get('units_dot'), 'dot')}</td>"
            f"<td>{code}</td><td>{len(m.get('errors', []))}</td></tr>")
    out.append("</table></body></html>")
    path = folder / "index.html"
    path.write_text("\n".join(out) + "\n")
    return path
