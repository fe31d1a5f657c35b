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

Where side values are added into a stream between the span's blocks (``Stream.adds``:
ControlNet residuals, VACE hints), ``in`` stands for the stream's *base*, its input plus
this call's side values: the residual is ``out - base`` and a reuse returns ``base +
residual``, so a side input that changes per step is applied fresh, never replayed.

Residuals are ordered span by span, live streams in span order.  Nodes a span must keep
(stream-independent values read after it, ``Span.keep``) stay in the main graph.
Both builders work on a copy (:func:`~omnicompile.passes.edit.copy_graph_module`).
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from .common import example_value
from .edit import add_placeholder, copy_graph_module, output_values, safe_name, set_outputs
from .errors import RewriteError
from .spans import Span

__all__ = ["build_variant", "build_cond", "guard_span"]


def _fake_like(node: fx.Node):
    return example_value(node)


def build_variant(gm: fx.GraphModule, spans: Sequence[Span], reuse: Sequence[bool]) -> fx.GraphModule:
    if len(reuse) != len(spans):
        raise RewriteError("bad_decision", f"{len(reuse)} decisions for {len(spans)} spans")
    new, env = copy_graph_module(gm)
    g = new.graph
    extra_out: list[fx.Node] = []
    repl: dict[fx.Node, fx.Node] = {}   # outputs of earlier spans -> what replaced them
    for sp, r in zip(spans, reuse):
        inside = {env[n] for n in sp.nodes}
        keep = {env[n] for n in sp.keep}
        last = max((env[n] for n in sp.nodes), key=lambda n: _order(g)[n])
        for s in sp.live_streams:
            o = env[s.output]
            if r:
                res = add_placeholder(g, f"omni_res_{safe_name(sp.name)}_{s.name}", _fake_like(s.input))
                x, last = stream_base(g, env, repl, s, last)
                with g.inserting_after(last):
                    y = g.call_function(operator.add, (x, res))
                y.meta["example_value"] = _fake_like(s.output)
                o.replace_all_uses_with(y, delete_user_cb=lambda u: u not in inside or u in keep)
                repl[o] = y
                last = y
            else:
                x, after = stream_base(g, env, repl, s, o)
                with g.inserting_after(after):
                    d = g.call_function(operator.sub, (o, x))
                d.meta["example_value"] = _fake_like(s.output)
                extra_out.append(d)
    # read the outputs only now: a stream output may itself be a graph output, replaced above
    out_node, outs = output_values(g)
    set_outputs(out_node, outs + extra_out)
    g.eliminate_dead_code()
    g.lint()
    new.recompile()
    return new


def stream_base(g: fx.Graph, env: dict, repl: dict, s, after: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The value a stream's residual is taken against: its input plus the side values added
    into it between the span's blocks (``Stream.adds``: this call's values), inserted after
    ``after``.  Returns ``(base, last node inserted)``; without side additions ``(input,
    after)``."""
    x = _resolve(repl, env[s.input])
    for h in s.adds:
        with g.inserting_after(after):
            x = g.call_function(operator.add, (x, _resolve(repl, env[h])))
        x.meta["example_value"] = _fake_like(s.input)
        after = x
    return x, after


def _resolve(repl: dict, n: fx.Node) -> fx.Node:
    """A span's input may be an earlier span's output that the rewrite replaced."""
    while n in repl:
        n = repl[n]
    return n


def _order(g: fx.Graph) -> dict:
    return {n: i for i, n in enumerate(g.nodes)}


def build_cond(gm: fx.GraphModule, spans: Sequence[Span]) -> fx.GraphModule:
    new, env = copy_graph_module(gm)
    g = new.graph
    preds = [add_placeholder(g, f"omni_pred_{k}", None) for k in range(len(spans))]
    res_phs = [[add_placeholder(g, f"omni_res_{safe_name(sp.name)}_{s.name}", _fake_like(s.input))
                for s in sp.live_streams] for sp in spans]
    extra_out: list[fx.Node] = []
    repl: dict[fx.Node, fx.Node] = {}
    for k, sp in enumerate(spans):
        extra_out.extend(guard_span(new, env, repl, k, sp, preds[k], [res_phs[k]], "residual"))
    out_node, outs = output_values(g)      # after the spans: a stream output may be a graph output
    set_outputs(out_node, outs + extra_out)
    g.eliminate_dead_code()
    g.lint()
    new.recompile()
    return new


def guard_span(new: fx.GraphModule, env: dict, repl: dict, k: int, sp: Span, pred: fx.Node,
               state: list[list[fx.Node]], kind: str, coeffs: Sequence[fx.Node] = ()) -> list[fx.Node]:
    """Replace span ``sp`` of the copied graph ``new`` by ``cond(pred, reuse, compute)``.

    ``kind="residual"``: ``state = [res]`` (one tensor per live stream); reuse returns
    ``in + res``; the new state is ``[out - in]`` (compute) or a copy of ``res`` (reuse).
    ``in`` is the stream's base (:func:`stream_base`: its input plus this call's side
    additions), computed in the main graph and passed to both branches.

    ``kind="window"``: ``state = [res_prev, res_last]`` and ``coeffs = (a, b)`` (0-d
    tensors); reuse returns ``in + a * res_prev + b * res_last`` (DiCache's trajectory
    alignment, ``a = 1 - gamma``, ``b = gamma``; ``a = 0, b = 1`` is plain reuse); compute
    shifts the window to ``[res_last, out - in]``; reuse keeps it.

    Returns the new state nodes, flattened in the order of ``state``.  ``repl`` maps span
    outputs already replaced by earlier spans (a later span's input may be one).
    """
    g = new.graph
    keep = {env[n] for n in sp.keep}
    body = [env[n] for n in sp.nodes if env[n] not in keep]
    body_set = set(body)
    operands: list[fx.Node] = []
    for n in body:
        for a in n.all_input_nodes:
            if a not in body_set and a not in operands:
                operands.append(a)
    for a in operands:   # tensors, and the sizes of a graph with symbolic shapes (cond takes SymInts)
        if not isinstance(example_value(a), (torch.Tensor, torch.SymInt)):
            raise RewriteError("non_tensor_operand",
                               f"span reads the non-tensor value {a.name}; torch.cond needs tensors", sp.name)
    live = sp.live_streams
    outs_sp = [env[s.output] for s in live]
    flat_state = [t for group in state for t in group]
    extra = flat_state + list(coeffs)
    order = _order(g)
    anchor = max(body + [p for p in extra if p.op != "placeholder"], key=lambda n: order[n])
    # the residual is taken against in + this call's side additions, computed outside the cond
    bases = []
    for s in live:
        b, anchor = stream_base(g, env, repl, s, anchor)
        bases.append(b)
    for b in bases:
        if b not in operands:
            operands.append(b)
    true_gm = _branch(new, operands, extra, body, bases, outs_sp, compute=True, kind=kind)
    false_gm = _branch(new, operands, extra, body, bases, outs_sp, compute=False, kind=kind)
    tname, fname = f"omni_compute_{k}", f"omni_reuse_{k}"
    new.add_submodule(tname, true_gm)
    new.add_submodule(fname, false_gm)
    with g.inserting_after(anchor):
        t_attr = g.get_attr(tname)
    with g.inserting_after(t_attr):
        f_attr = g.get_attr(fname)
    with g.inserting_after(f_attr):
        c = g.call_function(torch.ops.higher_order.cond,   # predicate True -> reuse
                            (pred, f_attr, t_attr, tuple(operands + extra)))
    n_out = len(live) + len(flat_state)
    got = []
    cur = c
    for i in range(n_out):
        with g.inserting_after(cur):
            gi = g.call_function(operator.getitem, (c, i))
        got.append(gi)
        cur = gi
    for i, o in enumerate(outs_sp):
        got[i].meta["example_value"] = example_value(o)
        o.replace_all_uses_with(got[i], delete_user_cb=lambda u: u not in body_set)
        repl[o] = got[i]
    for i, t in enumerate(flat_state):
        got[len(live) + i].meta["example_value"] = example_value(t)
    return got[len(live):]


def _branch(root: fx.GraphModule, operands, extra, body, ins, outs_sp, compute: bool, kind: str) -> fx.GraphModule:
    bg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in list(operands) + list(extra):
        p = bg.placeholder(a.name)
        p.meta.update({k: v for k, v in a.meta.items() if k in ("example_value", "val")})
        env[a] = p
    n = len(ins)
    if kind == "residual":
        res = [env[r] for r in extra[:n]]
    else:
        prev, last = [env[r] for r in extra[:n]], [env[r] for r in extra[n:2 * n]]
        a, b = env[extra[2 * n]], env[extra[2 * n + 1]]

    def fresh(t):  # cond merges output metadata: return new contiguous tensors
        return bg.call_method("clone", (t,), {"memory_format": torch.contiguous_format})

    def contig(t):
        return bg.call_method("contiguous", (t,))

    if compute:
        for node in body:
            env[node] = bg.node_copy(node, lambda x: env[x])
        outs = [fresh(env[o]) for o in outs_sp]
        new_res = [contig(bg.call_function(operator.sub, (env[o], env[x]))) for o, x in zip(outs_sp, ins)]
        state = new_res if kind == "residual" else [fresh(t) for t in last] + new_res
    else:
        if kind == "residual":
            delta = res
            state = [fresh(r) for r in res]
        else:
            delta = [bg.call_function(operator.add, (bg.call_function(operator.mul, (a, p)),
                                                     bg.call_function(operator.mul, (b, q))))
                     for p, q in zip(prev, last)]
            state = [fresh(t) for t in prev] + [fresh(t) for t in last]
        outs = [contig(bg.call_function(operator.add, (env[x], d))) for x, d in zip(ins, delta)]
    bg.output(tuple(outs + state))
    bg.lint()
    return fx.GraphModule(root, bg)
