"""Guarded reuse rewrite.

Every cacheable span becomes a branch: *compute* the span and refresh the cached residual
of each live stream (``out - in``), or *reuse*: skip the span and return ``in + residual``.
The cache tensors enter the graph as inputs and leave it as outputs; nothing inside the
graph mutates Python state.  Two forms:

``build_variant(gm, spans, reuse)``
    A specialised graph for one decision per span.  Reused spans are removed (their
    outputs become ``in + res``, dead code elimination drops the rest); computed spans add
    their residuals to the outputs.  The host picks the variant per step (static schedules).
    Signature: ``(*orig_inputs, *res[reused spans]) -> (*orig_outputs, *res[computed spans])``.

``build_cond(gm, spans)``
    One graph in which each span is a ``torch.ops.higher_order.cond`` on a boolean predicate
    input (True = reuse).  Signature:
    ``(*orig_inputs, *pred[spans], *res[all spans]) -> (*orig_outputs, *res[all spans])``.
    The reuse branch returns a copy of the residual (cond branches may not alias inputs).

Residuals are ordered span by span, live streams in span order.  Nodes a span must keep
(stream-independent values read after it, ``Span.keep``) stay in the main graph.
Both builders work on a copy (:func:`~omnicompile.passes.common.copy_graph_module`).
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from omnicompile.errors import RewriteError
from omnicompile.passes.common import copy_graph_module, example_value
from omnicompile.passes.spans import Span

__all__ = ["build_variant", "build_cond", "residual_specs"]


def residual_specs(spans: Sequence[Span]) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every residual, in signature order."""
    return [(f"{sp.name}:{s.name}", s.shape, s.dtype) for sp in spans for s in sp.live_streams]


def _placeholders(g: fx.Graph) -> list[fx.Node]:
    return [n for n in g.nodes if n.op == "placeholder"]


def _add_placeholder(g: fx.Graph, name: str, like=None) -> fx.Node:
    last = _placeholders(g)[-1]
    with g.inserting_after(last):
        ph = g.placeholder(name)
    ph._dynamo_source = None  # compile_fx's AOT path requires the attribute
    if like is not None:
        ph.meta["example_value"] = like
    return ph


def _fake_like(node: fx.Node):
    ev = example_value(node)
    return ev


def _output_values(g: fx.Graph) -> tuple[fx.Node, list]:
    out = next(n for n in g.nodes if n.op == "output")
    val = out.args[0]
    if isinstance(val, (tuple, list)):
        return out, list(val)
    return out, [val]


def _set_outputs(out: fx.Node, values: list) -> None:
    out.args = (tuple(values),)


def build_variant(gm: fx.GraphModule, spans: Sequence[Span], reuse: Sequence[bool]) -> fx.GraphModule:
    if len(reuse) != len(spans):
        raise RewriteError("bad_decision", f"{len(reuse)} decisions for {len(spans)} spans")
    new, env = copy_graph_module(gm)
    g = new.graph
    out_node, outs = _output_values(g)
    extra_out: list[fx.Node] = []
    repl: dict[fx.Node, fx.Node] = {}   # outputs of earlier spans -> what replaced them
    for sp, r in zip(spans, reuse):
        inside = {env[n] for n in sp.nodes}
        keep = {env[n] for n in sp.keep}
        last = max((env[n] for n in sp.nodes), key=lambda n: _order(g)[n])
        for s in sp.live_streams:
            x, o = _resolve(repl, env[s.input]), env[s.output]
            if r:
                res = _add_placeholder(g, f"omni_res_{_safe(sp.name)}_{s.name}", _fake_like(s.input))
                with g.inserting_after(last):
                    y = g.call_function(operator.add, (x, res))
                y.meta["example_value"] = _fake_like(s.output)
                o.replace_all_uses_with(y, delete_user_cb=lambda u: u not in inside or u in keep)
                repl[o] = y
                last = y
            else:
                with g.inserting_after(o):
                    d = g.call_function(operator.sub, (o, x))
                d.meta["example_value"] = _fake_like(s.output)
                extra_out.append(d)
    _set_outputs(out_node, outs + extra_out)
    g.eliminate_dead_code()
    g.lint()
    new.recompile()
    return new


def _resolve(repl: dict, n: fx.Node) -> fx.Node:
    """A span's input may be an earlier span's output that the rewrite replaced."""
    while n in repl:
        n = repl[n]
    return n


def _order(g: fx.Graph) -> dict:
    return {n: i for i, n in enumerate(g.nodes)}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def build_cond(gm: fx.GraphModule, spans: Sequence[Span]) -> fx.GraphModule:
    new, env = copy_graph_module(gm)
    g = new.graph
    out_node, outs = _output_values(g)
    preds = []
    for k, sp in enumerate(spans):
        preds.append(_add_placeholder(g, f"omni_pred_{k}", None))
    res_phs: list[list[fx.Node]] = []
    for sp in spans:
        res_phs.append([_add_placeholder(g, f"omni_res_{_safe(sp.name)}_{s.name}", _fake_like(s.input))
                        for s in sp.live_streams])
    extra_out: list[fx.Node] = []
    repl: dict[fx.Node, fx.Node] = {}
    for k, sp in enumerate(spans):
        keep = {env[n] for n in sp.keep}
        body = [env[n] for n in sp.nodes if env[n] not in keep]
        body_set = set(body)
        operands: list[fx.Node] = []
        for n in body:
            for a in n.all_input_nodes:
                if a not in body_set and a not in operands:
                    operands.append(a)
        for a in operands:
            ev = example_value(a)
            if not isinstance(ev, torch.Tensor) and a.op != "placeholder":
                raise RewriteError("non_tensor_operand",
                                   f"span reads the non-tensor value {a.name}; torch.cond needs tensors", sp.name)
            if not isinstance(ev, torch.Tensor):
                raise RewriteError("non_tensor_operand", f"span reads the non-tensor input {a.name}", sp.name)
        live = sp.live_streams
        ins = [_resolve(repl, env[s.input]) for s in live]
        outs_sp = [env[s.output] for s in live]
        for x in ins:
            if x not in operands:
                operands.append(x)
        true_gm = _branch(new, operands, res_phs[k], body, ins, outs_sp, compute=True)
        false_gm = _branch(new, operands, res_phs[k], body, ins, outs_sp, compute=False)
        tname, fname = f"omni_true_{k}", f"omni_false_{k}"
        new.add_submodule(tname, true_gm)
        new.add_submodule(fname, false_gm)
        last = max(body, key=lambda n: _order(g)[n])
        with g.inserting_after(last):
            t_attr = g.get_attr(tname)
        with g.inserting_after(t_attr):
            f_attr = g.get_attr(fname)
        with g.inserting_after(f_attr):
            # predicate True -> reuse branch
            c = g.call_function(torch.ops.higher_order.cond,
                                (preds[k], f_attr, t_attr, tuple(operands + res_phs[k])))
        cur = c
        got = []
        for i in range(2 * len(live)):
            with g.inserting_after(cur):
                gi = g.call_function(operator.getitem, (c, i))
            got.append(gi)
            cur = gi
        for i, o in enumerate(outs_sp):
            ev = example_value(o)
            got[i].meta["example_value"] = ev
            o.replace_all_uses_with(got[i], delete_user_cb=lambda u: u not in body_set)
            repl[o] = got[i]
        for i in range(len(live)):
            got[len(live) + i].meta["example_value"] = example_value(ins[i])
        extra_out.extend(got[len(live):])
    _set_outputs(out_node, outs + extra_out)
    g.eliminate_dead_code()
    g.lint()
    new.recompile()
    return new


def _branch(root: fx.GraphModule, operands, res_phs, body, ins, outs_sp, compute: bool) -> fx.GraphModule:
    bg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in operands:
        p = bg.placeholder(a.name)
        p.meta.update({k: v for k, v in a.meta.items() if k in ("example_value", "val")})
        env[a] = p
    res_in = []
    for r in res_phs:
        p = bg.placeholder(r.name)
        p.meta.update({k: v for k, v in r.meta.items() if k in ("example_value", "val")})
        res_in.append(p)
    if compute:
        for n in body:
            env[n] = bg.node_copy(n, lambda a: env[a])
        # both branches return fresh contiguous tensors: cond merges output metadata
        # (strides, storage offset) and a stream output is often a view (a split half)
        outs = [bg.call_method("clone", (env[o],), {"memory_format": torch.contiguous_format})
                for o in outs_sp]
        resid = [bg.call_method("contiguous", (bg.call_function(operator.sub, (env[o], env[x])),))
                 for o, x in zip(outs_sp, ins)]
        bg.output(tuple(outs + resid))
    else:
        outs = [bg.call_method("contiguous", (bg.call_function(operator.add, (env[x], r)),))
                for x, r in zip(ins, res_in)]
        keep = [bg.call_method("clone", (r,), {"memory_format": torch.contiguous_format}) for r in res_in]
        bg.output(tuple(outs + keep))
    bg.lint()
    return fx.GraphModule(root, bg)
