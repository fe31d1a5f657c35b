"""Guarded reuse rewrite.

Every cacheable span becomes a branch: *compute* the span and refresh the cached residual
of each live stream (``out - in``), or *reuse*: skip the span and return ``in + residual``.
The cache tensors enter the graph as inputs and leave it as outputs; nothing inside the
graph mutates Python state.  Two forms:

``build_variant(gm, spans, reuse, finite=False)``
    A specialised graph for one decision per span.  Reused spans are removed (their
    outputs become ``in + res``, dead code elimination drops the rest); computed spans add
    their residuals to the outputs.  The host picks the variant per step (static schedules).
    Signature: ``(*orig_inputs, *res[reused spans]) -> (*orig_outputs, *res[computed spans])``,
    with ``finite=True`` also ``*ok[computed spans]``: a 0-d bool per span, all of its new
    residuals finite (computed where the cache is refreshed; the host reads it only where it
    already syncs, before it would reuse that cache).

``build_cond(gm, spans, finite=False, pull_scalars=False)``
    One graph in which each span is a ``torch.ops.higher_order.cond`` on a boolean predicate
    input (True = reuse).  Signature:
    ``(*orig_inputs, *pred[spans], *res[all spans]) -> (*orig_outputs, *res[all spans])``.
    The reuse branch returns a copy of the residual (cond branches may not alias inputs).
    With ``finite=True`` the cache's finiteness flag is state too and part of the guard: a
    span reuses only if ``pred and ok``; signature
    ``(*orig, *pred[spans], *res[all spans], *ok[spans]) -> (*orig_out, *res[all spans],
    *ok'[spans], *blocked[spans])``, ``blocked = pred and not ok`` (the host wanted a reuse,
    the cache was not finite: the span was computed), read back with the report, not per step.

A cached residual that is not finite is never replayed: ``out - in`` of a step whose input
held a NaN or an infinity carries it, and reusing it would spread one bad step over the run
of reuses that follows.

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
from typing import Optional, Sequence

import torch
import torch.fx as fx

from .common import example_value
from .edit import add_placeholder, copy_graph_module, output_values, safe_name, set_outputs
from .errors import RewriteError
from .collectives import cp_group, eliminate_dead_code
from .spans import Span

__all__ = ["build_variant", "build_cond", "guard_span", "finite_flag"]


def _fake_like(node: fx.Node):
    return example_value(node)


def finite_flag(g: fx.Graph, tensors: Sequence[fx.Node], after: fx.Node) -> fx.Node:
    """Insert ``all(isfinite(t)) for every t`` (a 0-d bool) after ``after``; returns it."""
    flag = None
    cur = after
    for t in tensors:
        with g.inserting_after(cur):
            fin = g.call_function(torch.isfinite, (t,))
        with g.inserting_after(fin):
            a = g.call_function(torch.all, (fin,))
        cur = a
        ev = example_value(t)
        if isinstance(ev, torch.Tensor):
            fin.meta["example_value"] = torch.isfinite(ev)
            a.meta["example_value"] = fin.meta["example_value"].all()
        if flag is not None:
            with g.inserting_after(cur):
                a2 = g.call_function(torch.logical_and, (flag, a))
            if "example_value" in a.meta:
                a2.meta["example_value"] = a.meta["example_value"]
            cur = a = a2
        flag = a
    return flag


#: the largest extrapolation coefficient the online fit may choose (``extrapolate``)
ALPHA_MAX = 1.0


def build_variant(gm: fx.GraphModule, spans: Sequence[Span], reuse: Sequence[bool],
                  finite: bool = False, extrapolate: bool = False) -> fx.GraphModule:
    """One decision per span: reused (``in + residual``) or computed (``out - in`` returned).

    With ``extrapolate`` every span takes ``(r_last..., r_prev..., scalar)`` — its last two
    computed residuals per live stream and a 0-d float — and a reused span adds
    ``r_last + scalar * (r_last - r_prev)`` (the scalar is ``alpha * k / d``: the fitted
    coefficient times the staleness ratio, the host's product); a computed span takes the
    staleness ratio ``k_new`` of this step as its scalar and also returns, last, its new
    coefficient ``alpha'``: the least-squares fit of ``out - in - r_last`` on
    ``k_new * (r_last - r_prev)`` over its streams, clipped to ``[0, ALPHA_MAX]`` (0 when the
    fit is undefined or not finite) — an extrapolation that would have increased the error of
    this step's residual gets 0."""
    if len(reuse) != len(spans):
        raise RewriteError("bad_decision", f"{len(reuse)} decisions for {len(spans)} spans")
    new, env = copy_graph_module(gm)
    g = new.graph
    extra_out: list[fx.Node] = []
    flags: list[fx.Node] = []
    alphas: list[fx.Node] = []
    repl: dict[fx.Node, fx.Node] = {}   # outputs of earlier spans -> what replaced them
    for sp, r in zip(spans, reuse):
        new_res: list[fx.Node] = []
        inside = {env[n] for n in sp.nodes}
        keep = {env[n] for n in sp.keep}
        last = max((env[n] for n in sp.nodes), key=lambda n: _order(g)[n])
        window = None
        if extrapolate or r:
            lasts = [add_placeholder(g, f"omni_res_{safe_name(sp.name)}_{s.name}", _fake_like(s.input))
                     for s in sp.live_streams]
        if extrapolate:
            prevs = [add_placeholder(g, f"omni_resprev_{safe_name(sp.name)}_{s.name}", _fake_like(s.input))
                     for s in sp.live_streams]
            scalar = add_placeholder(g, f"omni_coef_{safe_name(sp.name)}", _scalar_like(sp.live_streams[0].input))
            window = (lasts, prevs, scalar)
        for j, s in enumerate(sp.live_streams):
            o = env[s.output]
            if r:
                res = lasts[j]
                x, last = stream_base(g, env, repl, s, last)
                if window is not None:     # r_last + coef * (r_last - r_prev)
                    with g.inserting_after(last):
                        dif = g.call_function(torch.sub, (res, prevs[j]))
                    with g.inserting_after(dif):
                        step = g.call_function(torch.mul, (dif, scalar))
                    with g.inserting_after(step):
                        res = g.call_function(torch.add, (lasts[j], step))
                    for n in (dif, step, res):
                        n.meta["example_value"] = _fake_like(s.input)
                    last = res
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
                new_res.append(d)
        if finite and not r:
            flags.append(finite_flag(g, new_res, max(new_res, key=lambda n: _order(g)[n])))
        if window is not None and not r:
            alphas.append(_fit_alpha(g, new_res, *window, group=cp_group(gm.graph)))
    # read the outputs only now: a stream output may itself be a graph output, replaced above
    out_node, outs = output_values(g)
    set_outputs(out_node, outs + extra_out + flags + alphas)
    eliminate_dead_code(g)         # dead collectives too (passes.collectives)
    g.lint()
    new.recompile()
    return new


def _scalar_like(node: fx.Node):
    """A 0-d float32 fake on ``node``'s device (the example of a scalar input)."""
    ev = example_value(node)
    return ev.new_empty((), dtype=torch.float32)


def _fit_alpha(g: fx.Graph, new_res: Sequence[fx.Node], lasts, prevs, k_new, group=None) -> fx.Node:
    """``alpha' = clip(<e, u> / <u, u>, 0, ALPHA_MAX)`` over the streams (float32), with
    ``e = new - r_last`` and ``u = k_new (r_last - r_prev)``; 0 where ``<u, u>`` is 0 or the
    ratio is not finite.  Inserted after the last new residual.  Under context parallelism
    (``group``) both sums run over every rank's shard (a functional all_reduce): every rank fits
    the coefficient of the whole sequence, as a single process does."""
    at = max(new_res, key=lambda n: _order(g)[n])
    num = den = None

    def op(fn, *args):
        nonlocal at
        with g.inserting_after(at):
            at = g.call_method(fn, args) if isinstance(fn, str) else g.call_function(fn, args)
        return at

    for d, rl, rp in zip(new_res, lasts, prevs):
        e = op(torch.sub, op("float", d), op("float", rl))
        u = op(torch.mul, op(torch.sub, op("float", rl), op("float", rp)), k_new)
        a, b = op(torch.sum, op(torch.mul, e, u)), op(torch.sum, op(torch.mul, u, u))
        num = a if num is None else op(torch.add, num, a)
        den = b if den is None else op(torch.add, den, b)
    if group is not None:
        c10d = torch.ops._c10d_functional
        num = op(c10d.wait_tensor.default, op(c10d.all_reduce.default, num, "sum", group))
        den = op(c10d.wait_tensor.default, op(c10d.all_reduce.default, den, "sum", group))
    ratio = op(torch.div, num, den)
    ok = op(torch.logical_and, op(torch.gt, den, 0.0), op(torch.isfinite, ratio))
    clipped = op(torch.clamp, ratio, 0.0, ALPHA_MAX)
    return op(torch.where, ok, clipped, op(torch.zeros_like, clipped))


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


def build_cond(gm: fx.GraphModule, spans: Sequence[Span], finite: bool = False,
               pull_scalars: bool = False) -> fx.GraphModule:
    new, env = copy_graph_module(gm)
    g = new.graph
    preds = [add_placeholder(g, f"omni_pred_{k}", None) for k in range(len(spans))]
    res_phs = [[add_placeholder(g, f"omni_res_{safe_name(sp.name)}_{s.name}", _fake_like(s.input))
                for s in sp.live_streams] for sp in spans]
    oks = [add_placeholder(g, f"omni_ok_{k}", None) for k in range(len(spans))] if finite else []
    extra_out: list[fx.Node] = []
    new_oks: list[fx.Node] = []
    blocked: list[fx.Node] = []
    repl: dict[fx.Node, fx.Node] = {}
    for k, sp in enumerate(spans):
        pred = preds[k]
        if finite:         # reuse only a finite cache; the host learns of a refusal from `blocked`
            anchor = next(n for n in g.nodes if n.op != "placeholder")
            with g.inserting_before(anchor):
                pred = g.call_function(torch.logical_and, (preds[k], oks[k]))
                no = g.call_function(torch.logical_not, (oks[k],))
                blocked.append(g.call_function(torch.logical_and, (preds[k], no)))
        got = guard_span(new, env, repl, k, sp, pred, [res_phs[k]], "residual", finite_in=oks[k] if finite else None,
                         pull_scalars=pull_scalars)
        if finite:
            new_oks.append(got.pop())
        extra_out.extend(got)
    out_node, outs = output_values(g)      # after the spans: a stream output may be a graph output
    set_outputs(out_node, outs + extra_out + new_oks + blocked)
    eliminate_dead_code(g)         # dead collectives too (passes.collectives)
    g.lint()
    new.recompile()
    return new


def guard_span(new: fx.GraphModule, env: dict, repl: dict, k: int, sp: Span, pred: fx.Node,
               state: list[list[fx.Node]], kind: str, coeffs: Sequence[fx.Node] = (),
               finite_in: Optional[fx.Node] = None, pull_scalars: bool = False) -> list[fx.Node]:
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

    ``finite_in`` (a 0-d bool node, the flag of the cache passed in): the branches also return
    a flag, appended to the state — compute: all of the new residuals finite; reuse: a copy of
    ``finite_in`` (the cache is kept).  In the window kind the reuse branch never multiplies
    ``r_prev`` by a zero ``a`` (``0 * nan`` is nan): a non-finite ``r_prev`` the caller chose
    not to blend in stays out.

    ``pull_scalars``: a SymFloat the span reads from outside (``.item()`` of a 0-d tensor:
    ``dynamic=True`` turns float module attributes into those) is recomputed inside the compute
    branch (:func:`_pull_scalars`); otherwise such a span is refused (``non_tensor_operand``).
    Only for an inner backend that runs the branches as they are (``eager``): Inductor traces
    them, and a scalar read inside a branch is an unbacked symbol that ``layer_norm`` cannot take.
    """
    g = new.graph
    keep = {env[n] for n in sp.keep}
    body = _pull_scalars([env[n] for n in sp.nodes if env[n] not in keep], sp.name, pull_scalars)
    body_set = set(body)
    operands: list[fx.Node] = []
    for n in body:
        for a in n.all_input_nodes:
            if a not in body_set and a not in operands:
                operands.append(a)
    live = sp.live_streams
    outs_sp = [env[s.output] for s in live]
    flat_state = [t for group in state for t in group]
    extra = flat_state + list(coeffs) + ([finite_in] if finite_in is not None else [])
    fin = finite_in is not None
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
    true_gm = _branch(new, operands, extra, body, bases, outs_sp, compute=True, kind=kind, finite=fin)
    false_gm = _branch(new, operands, extra, body, bases, outs_sp, compute=False, kind=kind, finite=fin)
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
    n_out = len(live) + len(flat_state) + fin
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
    if fin:
        got[-1].meta["example_value"] = torch.empty((), dtype=torch.bool)
    return got[len(live):]


def _operand_ok(a: fx.Node) -> bool:
    """What ``torch.cond`` takes as an operand: tensors, and the sizes of a graph with symbolic
    shapes (SymInts)."""
    return isinstance(example_value(a), (torch.Tensor, torch.SymInt))


def _pull_scalars(body: list[fx.Node], span: str, pull: bool) -> list[fx.Node]:
    """``body`` plus, in front, the computations of every other scalar it reads (SymFloat /
    SymBool: under ``dynamic=True`` Dynamo passes float attributes such as LayerNorm's ``eps``
    as 0-d tensors read with ``.item()``).  Those are recomputed inside the compute branch from
    their tensor inputs (cheap host scalars); a scalar with no tensor source (a graph input)
    cannot be passed to ``torch.cond``: ``non_tensor_operand``."""
    inside = set(body)
    pulled: set[fx.Node] = set()
    todo = [a for n in body for a in n.all_input_nodes if a not in inside and not _operand_ok(a)]
    while todo:
        a = todo.pop()
        if a in pulled or a in inside:
            continue
        if not pull or a.op not in ("call_function", "call_method") or isinstance(example_value(a), torch.Tensor):
            why = ("" if pull else " (with the eager inner backend it is recomputed inside the branch; "
                   "Inductor cannot trace that: use guard='variants' or dynamic=False)")
            raise RewriteError("non_tensor_operand",
                               f"span reads the non-tensor value {a.name}; torch.cond needs tensors{why}", span)
        pulled.add(a)
        todo.extend(x for x in a.all_input_nodes if not _operand_ok(x))
    if not pulled:
        return body
    order = _order(body[0].graph)
    return sorted(pulled, key=lambda n: order[n]) + body


def _branch(root: fx.GraphModule, operands, extra, body, ins, outs_sp, compute: bool, kind: str,
            finite: bool = False) -> fx.GraphModule:
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
        if finite:
            flag = None
            for r in new_res:
                f = bg.call_function(torch.all, (bg.call_function(torch.isfinite, (r,)),))
                flag = f if flag is None else bg.call_function(torch.logical_and, (flag, f))
            state = state + [flag]
    else:
        if kind == "residual":
            delta = res
            state = [fresh(r) for r in res]
        else:
            if finite:     # a == 0: r_prev stays out (it may be non-finite: 0 * nan is nan)
                use_prev = bg.call_function(operator.ne, (a, 0))
                delta = [bg.call_function(operator.add, (
                    bg.call_function(torch.where, (use_prev, bg.call_function(operator.mul, (a, p)), 0.0)),
                    bg.call_function(operator.mul, (b, q)))) for p, q in zip(prev, last)]
            else:
                delta = [bg.call_function(operator.add, (bg.call_function(operator.mul, (a, p)),
                                                         bg.call_function(operator.mul, (b, q))))
                         for p, q in zip(prev, last)]
            state = [fresh(t) for t in prev] + [fresh(t) for t in last]
        outs = [contig(bg.call_function(operator.add, (env[x], d))) for x, d in zip(ins, delta)]
        if finite:
            state = state + [fresh(env[extra[-1]])]
    bg.output(tuple(outs + state))
    bg.lint()
    return fx.GraphModule(root, bg)
