"""The dump's tables: the block/stream map (``graph*_blocks.json``), the per-unit costs
(``graph*_costs.csv``) and the unit dependency graph (regions and edges, drawn by
:mod:`omnicompile.dump.draw`).

**The unit dependency graph.**  Regions of the graph, in graph order: user inputs, the glue
code before, between and after the block groups (``prologue``, ``glue1``, ``epilogue``),
each cache unit, the output.  An edge says a region reads values of another; *stream*
edges (unit to unit) carry the values a cached span replaces by ``in + residual``, *side*
edges carry what every unit reads (temb, rotary tables), *data* edges the rest.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
import torch.fx as fx

from omnicompile.dump.info import GraphInfo
from omnicompile.graphs.cost import graph_size_symbols, node_flops, region_cost
from omnicompile.passes.common import is_heavy, is_param_placeholder, tensor_meta

log = logging.getLogger("omnicompile")

__all__ = ["block_map", "unit_costs", "unit_graph", "Region", "Edge", "meta_text", "nbytes"]


def meta_text(node: Any) -> dict:
    """``{"shape": [...], "dtype": "float32"}`` of a node's example value (None when it is
    not a tensor); symbolic sizes as text."""
    tm = tensor_meta(node)
    if tm is None:
        return {"shape": None, "dtype": None}
    shape, dtype, _ = tm
    return {"shape": [d if isinstance(d, int) else str(d) for d in shape], "dtype": str(dtype).replace("torch.", "")}


def nbytes(node: Any) -> int:
    """Bytes of a node's example value (0 when unknown or symbolic)."""
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


def block_map(info: GraphInfo, report: Any = None) -> dict:
    """The block/stream map of a graph, JSON-ready.  ``policy`` and ``guard`` are the
    report's (None without one)."""
    nodes = list(info.gm.graph.nodes)
    ph = [n for n in nodes if n.op == "placeholder"]
    params = [n for n in ph if is_param_placeholder(n)]
    ts = info.analysis.timestep
    inputs = [{"name": n.name, **meta_text(n), "timestep": n is ts} for n in ph if not is_param_placeholder(n)]
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
            "links": [[{"unit": i, "input": a.name, "output": b.name, **meta_text(b)} for a, b in link]
                      for i, link in enumerate(g.links)],
            "last_outputs": [o.name if o is not None else None for o in g.last_outs],
        })
    spans = []
    for k, sp in enumerate(info.spans):
        d = sp.describe()
        d["index"] = k
        d["group"] = sp.group
        d["side_inputs"] = [{"name": n.name, **meta_text(n)} for n in sp.side_inputs]
        d["keep"] = [n.name for n in sp.keep]
        d["flops_fraction"] = sp.flops / info.flops_total if info.flops_total else 0.0
        spans.append(d)
    return {
        "graph_id": info.graph_id, "nodes": len(nodes), "flops_per_call": info.flops_total,
        "inputs": inputs,
        "parameters": {"count": len(params), "bytes": sum(nbytes(n) for n in params)},
        "timestep_input": ts.name if ts is not None else None,
        "block_lists": lists, "groups": groups, "spans": spans,
        "refused": [r.to_dict() for r in info.refused],
        "policy": report.policy if report is not None else None,
        "guard": (report.guard or None) if report is not None else None,
    }


def unit_costs(info: GraphInfo) -> list[dict]:
    """Per cache unit: size, matmul work (and its formula in the graph's sizes), parameter
    bytes read, stream bytes a per-unit cache would hold, and the span (if any) that caches it."""
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
                "param_bytes": sum(nbytes(p) for p in params),
                "stream_bytes": sum(nbytes(o) for o in outs),
                "span": info.spans[k].name if k is not None else None,
            })
    return rows


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
                m = meta_text(n)
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
        m = meta_text(vals[0])
        shape = ("x".join(map(str, m["shape"])) if m["shape"] is not None else "")
        edges.append(Edge(src, dst, kind, [v.name for v in vals], shape))
    return list(regions.values()), edges   # insertion order = graph order
