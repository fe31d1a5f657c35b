"""Cache-induced noise measurement and correction (OmniCache, trajectory-oriented).

While a span is reused the model output is ``eps~ = eps + q``.  At a computed step the
graph also evaluates what reuse *would* have produced — every span replaced by
``in + cached residual`` and the rest of the graph after the first span re-run on those
values (the blocks are not re-run, so this costs the epilogue only) — and returns
``q = out_reuse - out`` per model output.  At the next reuse step the runtime passes the
last measured ``q`` and a coefficient ``gamma`` and the graph returns
``out_reuse - gamma * q`` (q_{s} ≈ gamma_s q_{s-1}).

Signatures (``n`` spans, ``m`` floating model outputs):

``build_measure_variant``: ``(*orig, *res[all spans]) -> (*orig_out, *res'[all spans], *q[m])``
``build_corrected_reuse``: ``(*orig, *res[all spans], gamma, *q[m]) -> (*orig_out)``
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from omnicompile.passes.common import copy_graph_module, example_value
from omnicompile.passes.rewrite import _add_placeholder, _output_values, _safe, _set_outputs, build_variant
from omnicompile.passes.spans import Span

__all__ = ["build_measure_variant", "build_corrected_reuse", "float_outputs"]


def float_outputs(gm: fx.GraphModule) -> list[int]:
    """Indices of the graph outputs that are floating-point tensors (the ones q covers)."""
    _, outs = _output_values(gm.graph)
    idx = []
    for i, o in enumerate(outs):
        ev = example_value(o) if isinstance(o, fx.Node) else None
        if isinstance(ev, torch.Tensor) and ev.dtype.is_floating_point:
            idx.append(i)
    return idx


def build_measure_variant(gm: fx.GraphModule, spans: Sequence[Span]) -> fx.GraphModule:
    new, env = copy_graph_module(gm)
    g = new.graph
    out_node, outs = _output_values(g)
    order = {n: i for i, n in enumerate(g.nodes)}
    span_nodes = [{env[n] for n in sp.nodes} for sp in spans]
    in_any_span = set().union(*span_nodes)
    res_phs = [[_add_placeholder(g, f"omni_res_{_safe(sp.name)}_{s.name}", example_value(s.input))
                for s in sp.live_streams] for sp in spans]
    new_res: list[fx.Node] = []
    alt: dict[fx.Node, fx.Node] = {}
    created: set = set()
    for sp, phs in zip(spans, res_phs):
        for s, r in zip(sp.live_streams, phs):
            x, o = env[s.input], env[s.output]
            with g.inserting_after(o):
                d = g.call_function(operator.sub, (o, x))
            d.meta["example_value"] = example_value(s.output)
            new_res.append(d)
    # the reuse path: walk the graph after the first span; span outputs become in + res,
    # every other node that reads an alternative value is copied onto the alternative path
    first = min(order[env[n]] for n in spans[0].nodes)
    stream_out = {env[s.output]: (env[s.input], r)
                  for sp, phs in zip(spans, res_phs) for s, r in zip(sp.live_streams, phs)}
    for n in list(g.nodes):
        if n.op in ("placeholder", "output") or order.get(n, -1) < first:
            continue
        if n in stream_out:
            x, r = stream_out[n]
            with g.inserting_after(n):
                y = g.call_function(operator.add, (alt.get(x, x), r))
            y.meta["example_value"] = example_value(n)
            alt[n] = y
            created.add(y)
            continue
        if n in in_any_span or n in created:
            continue
        if any(a in alt for a in n.all_input_nodes):
            with g.inserting_after(n):
                c = g.node_copy(n, lambda a: alt.get(a, a))
            alt[n] = c
            created.add(c)
    qs = []
    for i in float_outputs(gm):
        o = outs[i]
        if o in alt:
            with g.inserting_before(out_node):
                q = g.call_function(operator.sub, (alt[o], o))
        else:   # the output does not depend on any span: reuse changes nothing
            with g.inserting_before(out_node):
                q = g.call_function(torch.zeros_like, (o,))
        qs.append(q)
    _set_outputs(out_node, outs + new_res + qs)
    g.eliminate_dead_code()
    g.lint()
    new.recompile()
    return new


def build_corrected_reuse(gm: fx.GraphModule, spans: Sequence[Span]) -> fx.GraphModule:
    new = build_variant(gm, spans, (True,) * len(spans))
    g = new.graph
    out_node, outs = _output_values(g)
    gamma = _add_placeholder(g, "omni_gamma", torch.empty(()))
    idx = float_outputs(gm)
    qs = [_add_placeholder(g, f"omni_q_{i}", example_value(outs[i])) for i in idx]
    fixed = list(outs)
    for i, q in zip(idx, qs):
        with g.inserting_before(out_node):
            gq = g.call_function(operator.mul, (gamma, q))
            fixed[i] = g.call_function(operator.sub, (outs[i], gq))
    _set_outputs(out_node, fixed)
    g.lint()
    new.recompile()
    return new
