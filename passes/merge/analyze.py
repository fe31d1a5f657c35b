"""Per-block analysis: which input carries the axis, which side inputs line up with it, which
part of the block is the region, and whether it sits in the right layer.

:func:`analyze_block` finds the block's main stream input and its axis dim, traces the part of
the block that depends on it (tagging side inputs only where a broadcast needs them: "Side
inputs" in the package docstring), reads the layer's role from its attention ("Placement")
and, with ``merge_ffn=False``, cuts the region before the feed-forward.  Batch x axis rows are
proved from the glue that made them out of the previous block's output.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch
import torch.fx as fx

from ..common import Reason, example_value, is_param_placeholder, module_paths
from .geometry import Geometry
from .layout import Layout, Refuse, op_name
from .options import LAYERS
from .trace import Tracer, trace_region

__all__ = ["analyze_block", "externals", "region_outputs"]


_FFN = {"ff", "ffn", "ff_context", "mlp", "proj_mlp", "feed_forward", "feedforward", "ff_out"}


def _is_ffn(n: fx.Node, block: str) -> bool:
    for p in module_paths(n):
        if p.startswith(block + "."):
            if p[len(block) + 1:].split(".")[0] in _FFN:
                return True
    return False


def externals(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The values ``nodes`` read from outside themselves, in order of first use."""
    inside = set(nodes)
    seen: dict = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                seen.setdefault(a, None)
    return list(seen)


def region_outputs(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The nodes of ``nodes`` used outside them."""
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]


def _sdpa_role(tr: Tracer) -> Optional[str]:
    """Where the axis lands in the region's attention: "seq" (some attention runs along it),
    "batch" (every attention runs per row) or None (no attention op)."""
    seen = False
    seq = False
    for n in tr.nodes:
        if op_name(n) != "scaled_dot_product_attention":
            continue
        seen = True
        q = n.kwargs.get("query", n.args[0] if n.args else None)
        qf = tr.fv.get(q)
        if not isinstance(qf, torch.Tensor):
            return None
        if tr.is_sym(qf.shape[-2]) or tr.is_sym(qf.shape[-1]):
            seq = True
    if not seen:
        return None
    return "seq" if seq else "batch"


def _side_candidates(t: fx.Node, main_lay: Layout, axis: str, n_rows: int) -> list[tuple[int, Layout]]:
    ev = example_value(t)
    if not isinstance(ev, torch.Tensor):
        return []
    out = []
    want = int(main_lay.value({axis: n_rows}))
    for d, v in enumerate(ev.shape):
        if v == want:
            out.append((d, main_lay))
        elif axis == "token" and main_lay.segs == ((axis,),) and v > n_rows:   # text rows + image rows
            out.append((d, Layout(((v - n_rows,), (axis,)))))
            out.append((d, Layout(((axis,), (v - n_rows,)))))
    return out


def _search(nodes, axes, main: fx.Node, main_tag: dict, main_lay: Layout, axis: str,
            n_rows: int, start: Optional[dict] = None) -> tuple[Optional[Tracer], Optional[dict], Optional[Refuse]]:
    """Trace with the main input tagged, adding side inputs where a broadcast needs them: at
    each failure, the untagged side inputs that feed the failing node are tried (one, then
    pairs: a cross-attention needs its key and value together); the choice that gets the trace
    furthest is kept; two choices that both complete the trace make the region ambiguous."""
    ext = externals(nodes)
    side = [t for t in ext if t is not main and not is_param_placeholder(t)]
    cands = {t: _side_candidates(t, main_lay, axis, n_rows) for t in side}
    order = {n: i for i, n in enumerate(nodes)}
    tagged = {main: dict(main_tag)}
    tagged.update({t: v for t, v in (start or {}).items() if t in set(ext)})
    inside = set(nodes)
    ready = None
    known = None
    for _ in range(len(side) + 1):
        if ready is not None:
            return ready, tagged, None
        if known is not None:
            fail, known = known, None
        else:
            try:
                return trace_region(nodes, axes, tagged), tagged, None
            except Refuse as e:
                fail = e
        if fail.node is None or fail.node not in order:
            return None, None, fail
        # culprits: side inputs behind the failing node's operands that carry no merged rows
        trf = fail.tracer
        plain = [a for a in fail.node.all_input_nodes
                 if trf is not None and a in trf.fv and not _carries(trf, trf.fv[a])]
        anc = set(plain)
        for a in plain:
            anc |= _ancestors(a, inside)
        opts = [(t, d, lay) for t in side if t not in tagged and t in anc for d, lay in cands[t]]
        if not opts:
            anc = _ancestors(fail.node, inside)
            opts = [(t, d, lay) for t in side if t not in tagged and t in anc for d, lay in cands[t]]
        direct = [o for o in opts if o[0] in fail.node.all_input_nodes]
        chosen = None
        for pool, size in ((opts, 1), (direct, 2), (opts, 2)):
            if size > len(pool):
                continue
            combos = [c for c in itertools.combinations(pool, size) if len({t for t, _, _ in c}) == size]
            if len(combos) > 32:
                continue
            best, best_prog, done, fails = [], -1, [], {}
            for combo in combos:
                trial = dict(tagged)
                for t, d, lay in combo:
                    trial[t] = {d: lay}
                try:
                    done.append((combo, trace_region(nodes, axes, trial)))
                    prog = len(nodes)
                except Refuse as e2:
                    prog = order.get(e2.node, -1)
                    if prog <= order[fail.node]:
                        continue
                    fails[combo] = e2
                if prog > best_prog:
                    best, best_prog = [combo], prog
                elif prog == best_prog:
                    best.append(combo)
            if len(done) > 1:
                return None, None, Refuse(
                    "merge_ambiguous_side", "side inputs can line up with the merged rows in more than one way: "
                    + "; ".join(", ".join(f"{t.name}[{d}]={lay}" for t, d, lay in c) for c, _ in done), fail.node)
            if len(best) > 1:
                return None, None, Refuse("merge_ambiguous_side", "more than one way to line up side inputs with "
                                          f"the merged rows at {fail.node.name}", fail.node)
            if best:
                chosen = best[0]
                if done:
                    ready = done[0][1]
                else:
                    known = fails.get(chosen)
                break
        if chosen is None:
            return None, None, fail
        for t, d, lay in chosen:
            tagged[t] = {d: lay}
    return None, None, Refuse("merge_trace_failed", "no consistent tagging of the side inputs")


def _carries(tr: Tracer, v) -> bool:
    flat = v if isinstance(v, (tuple, list)) else [v]
    return any(isinstance(t, torch.Tensor) and tr.has_sym(t) for t in flat)


def _ancestors(n: fx.Node, inside: set) -> set:
    seen = set()
    stack = [n]
    while stack:
        m = stack.pop()
        for a in m.all_input_nodes:
            if a not in seen:
                seen.add(a)
                if a in inside:
                    stack.append(a)
    return seen


def _glue_layout(gm: fx.GraphModule, main: fx.Node, dim: int, axis: str, n_rows: int, red: int) -> "Layout | Reason":
    """The layout of ``main``'s dim ``dim`` (rows ``B * N``), proved by tracing the glue that
    made it from the previous block's output, where the axis is a whole dim."""
    glue: list[fx.Node] = []
    sources: list[fx.Node] = []
    stack, seen = [main], {main}
    while stack:
        m = stack.pop()
        if "omni.block" in m.meta or m.op == "placeholder":
            sources.append(m)
            continue
        glue.append(m)
        if len(glue) > 32:
            return Reason("merge_batch_layout", "cannot find how the merged rows were laid out (glue too long)")
        for a in m.all_input_nodes:
            if a not in seen and not is_param_placeholder(a):
                seen.add(a)
                stack.append(a)
    srcs = [s for s in sources if "omni.block" in s.meta and isinstance(example_value(s), torch.Tensor)]
    cands = [(s, d) for s in srcs for d, v in enumerate(example_value(s).shape[:-1]) if v == n_rows]
    if len(cands) != 1:
        return Reason("merge_batch_layout", f"the rows of {main.name} are batch x {axis}; cannot prove their order "
                      "from the previous block's output")
    src, d = cands[0]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    glue.sort(key=lambda n: order[n])
    try:
        tr = trace_region(glue, {axis: (n_rows, red)}, {src: {d: Layout(((axis,),))}})
        lay = tr.dim_layout(tr.fv[main].shape[dim])
    except Refuse as e:
        return Reason("merge_batch_layout", f"cannot prove the row order of {main.name}: {e.message}")
    if not isinstance(lay, Layout):
        return Reason("merge_batch_layout", f"{main.name} dim {dim} does not carry the {axis} rows")
    return lay


def _group_layout(gm: fx.GraphModule, main: fx.Node, d: int, axis: str, groups: int, batch: int) -> Optional[Reason]:
    """Swapped placement: prove that ``main``'s rows before the axis dim ``d`` are ``batch x
    groups`` with the batch outer (the frames of a sample in a spatial layer, its positions in a
    temporal one), by tracing the glue from the previous block's output where the group axis
    is a whole dim.  None when proved."""
    shape = tuple(example_value(main).shape)
    other = "frame" if axis == "block" else "block"
    if d != 1 or shape[0] != batch * groups:
        return Reason("merge_batch_layout", f"the rows of {main.name} before the {axis} axis are not one dim of "
                      f"batch x {groups} ({'frames' if other == 'frame' else 'positions'})")
    lay = _glue_layout(gm, main, 0, other, groups, groups + 1)
    if isinstance(lay, Reason):
        return lay
    if lay != Layout.make([[batch, other]]):
        return Reason("merge_batch_layout", f"dim 0 of {main.name} is {lay}, not batch x {other} (batch outer)")
    return None


def analyze_block(gm, b, axis, axes, n_rows: int, per: int, merge_ffn: bool, placement: str = "paper",
                  groups: int = 1, geo: Optional[Geometry] = None):
    """Find the block's main input and axis dim, tag side inputs, check the placement and cut
    the feed-forward: (main, dim, layout, tracer, tagged, region) or a Reason.  ``groups > 1``
    (swapped placement): the rows before the axis dim must be proved ``[batch, groups]``, batch
    outer, so that one choice of rows per sample can be repeated over its ``groups`` rows."""
    subject = f"{b.name}:{axis}"
    nodes = list(b.nodes)
    outs = region_outputs(nodes)
    ext = [t for t in externals(nodes) if not is_param_placeholder(t)]
    out_shapes = {(tuple(example_value(o).shape), example_value(o).dtype) for o in outs
                  if isinstance(example_value(o), torch.Tensor)}
    mains = [t for t in ext if isinstance(example_value(t), torch.Tensor)
             and (tuple(example_value(t).shape), example_value(t).dtype) in out_shapes]
    want = n_rows * per
    cands = [(t, d) for t in mains for d, v in enumerate(example_value(t).shape[:-1]) if v == want]
    if not cands:
        return Reason("merge_no_axis", f"no stream input of the block has a dim of {want} rows "
                      f"(the {axis} axis)", subject)
    kept = axes[axis][1]
    found = []
    last_err = None
    layer = LAYERS[placement][axis]
    want_role = "seq" if (axis == "token" or placement == "swapped") else "batch"
    cut = False
    for main, d in cands:
        region0 = _dependents(nodes, main)
        if not merge_ffn:   # the cut lies before the first feed-forward node: trace no further
            k = next((i for i, n in enumerate(region0) if _is_ffn(n, b.name)), None)
            if k is not None:
                if any(op_name(n) == "scaled_dot_product_attention" for n in region0[k:]):
                    return Reason("merge_ffn", "the feed-forward runs before or beside the attention "
                                  "(merge_ffn=False cannot exclude it; merge_ffn=True merges the whole block)", subject)
                region0, cut = region0[:k], True
        if per == 1:
            lay = Layout(((axis,),))
        else:
            lay = _glue_layout(gm, main, d, axis, n_rows, kept)
            if isinstance(lay, Reason):
                last_err = Refuse(lay.code, lay.message)
                continue
        # the layer's role from a trace up to the first attention; the rest only where it fits
        first_attn = next((i for i, n in enumerate(region0) if op_name(n) == "scaled_dot_product_attention"), None)
        start = None
        if first_attn is not None and first_attn + 1 < len(region0):
            probe = region0[:first_attn + 1]
            tr, start, err = _search(probe, axes, main, {d: lay}, lay, axis, n_rows)
            if tr is None:
                last_err = err
                continue
            role = _sdpa_role(tr)
            if role != want_role:
                found.append((main, d, lay, None, start, role, region0))
                continue
        tr, tagged, err = _search(region0, axes, main, {d: lay}, lay, axis, n_rows, start)
        if tr is None:
            last_err = err
            continue
        role = _sdpa_role(tr)
        if groups > 1 and role == want_role:
            why = _group_layout(gm, main, d, axis, groups, geo.batch)
            if why is not None:
                last_err = Refuse(why.code, why.message)
                continue
        found.append((main, d, lay, tr, tagged, role, region0))
    if not found:
        e = last_err
        return Reason(e.code if e else "merge_trace_failed", e.message if e else "no consistent trace", subject)
    fitting = [f for f in found if f[5] == want_role]
    if not fitting:
        roles = {f[5] for f in found}
        if roles == {None}:
            return Reason("merge_placement", "no attention op in the block: cannot tell a spatial from a "
                          "temporal layer", subject)
        got = "along" if "seq" in roles else "across"
        how = (f" (merge_placement='swapped': the {axis} rows are this layer's attention sequence)"
               if placement == "swapped" else "")
        return Reason("merge_placement", f"the {axis} cache wraps {layer} layers{how}; attention here runs {got} "
                      "these rows", subject)
    if len(fitting) > 1:
        return Reason("merge_ambiguous_axis", "more than one dim of the block input could be the "
                      f"{axis} axis: " + ", ".join(f"{f[0].name}[{f[1]}]" for f in fitting), subject)
    main, d, lay, tr, tagged, _, region = fitting[0]
    if not merge_ffn:
        pre, why = _attention_prefix(b.name, region, tr, ends_before_ffn=cut)
        if pre is None:
            return Reason("merge_ffn", why, subject)
        if pre is not region:
            region = pre
            ext_r = set(externals(region))
            try:
                tr = trace_region(region, axes, {t: v for t, v in tagged.items() if t in ext_r})
            except Refuse as e:
                return Reason(e.code, e.message, subject)
    return main, d, lay, tr, tagged, region


def _dependents(nodes: Sequence[fx.Node], main: fx.Node) -> list[fx.Node]:
    """The nodes of ``nodes`` that depend on ``main``: the region; the rest (AdaLN tables from
    the timestep, text key/value projections) does not see the merged rows and runs in full."""
    dep = {main}
    out = []
    for n in nodes:
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
            out.append(n)
    return out


def _attention_prefix(block: str, nodes: list[fx.Node], tr: Tracer, ends_before_ffn: bool = False):
    """The block up to its feed-forward sub-layer: the longest prefix that holds every
    attention op, stops before the first feed-forward node and hands exactly one value with
    merged rows (the residual stream) to the rest.  ``ends_before_ffn``: ``nodes`` is already
    cut right before the first feed-forward node."""
    k = len(nodes) if ends_before_ffn else next((i for i, n in enumerate(nodes) if _is_ffn(n, block)), None)
    if k is None:
        return nodes, None
    last_attn = max((i for i, n in enumerate(nodes) if op_name(n) == "scaled_dot_product_attention"), default=-1)
    if last_attn < 0 or last_attn >= k:
        return None, "the feed-forward runs before or beside the attention (merge_ffn=False cannot exclude it)"

    def merged(n):
        v = tr.fv.get(n)
        flat = v if isinstance(v, (tuple, list)) else [v]
        return any(isinstance(t, torch.Tensor) and tr.has_sym(t) for t in flat)

    for c in range(k, last_attn, -1):
        pre = nodes[:c]
        crossing = [n for n in region_outputs(pre) if merged(n)]
        if len(crossing) == 1 and isinstance(tr.fv.get(crossing[0]), torch.Tensor):
            return pre, None
    return None, "no point before the feed-forward where a single merged value leaves the attention"
