"""The rewrite: run each planned region on the kept rows, and the op that fills by interpolation.

:func:`apply_merge` rewrites a copy of any graph that still holds planned regions (by node
name: a step variant that reused a region does not hold it; see "Facts written" in the package
docstring): merged, each region gathers its inputs' kept rows
(``torch.ops.omnicompile.merge``), runs its re-specialised templates and writes the computed
rows into the state (``unmerge``), whose inputs and outputs, and the split index tensors, are
appended to the signature (``passes/README.md``, invariant 7).  :func:`interpolation_index`
runs inside merged graphs with ``merge_fill="interpolate"``.
"""
from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.fx as fx

from ..common import example_value
from ..rewrite import finite_flag
from ..edit import add_placeholder, copy_graph_module, output_values, safe_name, set_outputs
from .layout import Ref, Size, map_args

if TYPE_CHECKING:
    from .plan import MergePlan, Wrap

__all__ = ["state_specs", "present_wraps", "apply_merge", "interpolation_index"]


_FAKE = None


def _fake(shape, dtype, device):
    global _FAKE
    from torch._subclasses.fake_tensor import FakeTensorMode
    if _FAKE is None:
        _FAKE = FakeTensorMode(allow_non_fake_inputs=True)
    with _FAKE:
        return torch.empty(tuple(shape), dtype=dtype, device=device)


def state_specs(wraps: Sequence[Wrap]) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of the state tensors of ``wraps``, in signature order."""
    return [(f"{w.block}:{o.name}", o.shape, o.dtype) for w in wraps if w.fill != "interpolate" for o in w.outputs]


def present_wraps(g: fx.GraphModule, plan: MergePlan) -> list[Wrap]:
    """The planned regions whose nodes are all in ``g`` (a step variant drops reused ones)."""
    names = {n.name for n in g.graph.nodes}
    return [w for w in plan.wraps if all(r in names for r in w.region)]


def apply_merge(g: fx.GraphModule, plan: MergePlan, merged: bool,
                phases: Optional[list] = None, finite: bool = False) -> tuple[fx.GraphModule, list[Wrap], list]:
    """Rewrite a copy of ``g``: every planned region present in ``g`` (by node name) runs on the
    kept rows (``merged=True``) or in full.  Signature: ``(*g_inputs, *state[present], *consts)
    -> (*g_outputs, *state'[present])`` (``state`` and ``consts`` only when merged), states
    ordered by :func:`state_specs`; ``consts`` are the split index tensors (graph inputs, not
    attributes: Inductor's AOT path takes only Dynamo's parameters as attributes).
    Returns the new graph, the wraps it holds and the constants of rotation phase 0.  With
    ``merge_rotate`` a wrap has several splits (``Wrap.splits``) of one shape: pass a list as
    ``phases`` and it receives one constants list per phase ``p`` of the graph (``p`` in
    ``[0, lcm of the wraps' phase counts)``; wrap ``w`` uses its split ``p % len(w.splits)``):
    the same graph runs every phase, the host picks the list.  With ``finite`` (and any state)
    the graph also returns, last, a 0-d bool: every new state tensor is finite (a cache that is
    not must never be replayed into the skipped rows of a later merged call)."""
    from ... import kernels  # noqa: F401  (registers torch.ops.omnicompile.*)

    new, _ = copy_graph_module(g)
    graph = new.graph
    present = present_wraps(new, plan)
    out_node, outs = output_values(graph)
    states: list[list[fx.Node]] = []
    for w in present:
        st = []
        for o in (w.outputs if w.fill != "interpolate" else []):
            if merged:
                st.append(add_placeholder(graph, f"omni_tok_{safe_name(w.block)}_{o.name}",
                                          _fake(o.shape, o.dtype, w.device)))
        states.append(st)
    extra: list[fx.Node] = []
    consts: list[list[torch.Tensor]] = []      # per index tensor: one per phase of its wrap
    by_name = {n.name: n for n in graph.nodes}
    for k, w in enumerate(present):
        if merged:
            extra.extend(_rewrite_wrap(new, by_name, k, w, states[k], consts))
        elif w.fill == "output":
            extra.extend(by_name[o.name] for o in w.outputs)
        elif w.fill == "interpolate":
            pass          # no state: skipped rows come from this step's computed rows
        else:
            rn, i = w.sites[w.main]
            x = by_name[rn].all_input_nodes[i]
            for o in w.outputs:
                on = by_name[o.name]
                with graph.inserting_after(on):
                    dlt = graph.call_function(operator.sub, (on, x))
                dlt.meta["example_value"] = _fake(o.shape, o.dtype, w.device)
                extra.append(dlt)
    flag = [finite_flag(graph, extra, out_node.prev)] if (finite and extra) else []
    set_outputs(out_node, outs + extra + flag)
    graph.lint()
    new.recompile()
    n_phases = math.lcm(*[len(w.splits) for w in present]) if (merged and present) else 1
    per_phase = [[ts[p % len(ts)] for ts in consts] for p in range(n_phases)]
    if phases is not None:
        phases[:] = per_phase
    return new, present, per_phase[0]


def _rewrite_wrap(gm: fx.GraphModule, by_name: dict, k: int, w: Wrap, caches: list[fx.Node],
                  consts: list) -> list[fx.Node]:
    graph = gm.graph
    region = [by_name[r] for r in w.region]
    rset = set(region)
    ext = {name: by_name[rn].all_input_nodes[i] for name, (rn, i) in w.sites.items()}
    ops = torch.ops.omnicompile
    N, K, P = w.rows, w.kept, w.sel
    env_red = {w.axis: K}
    tag = f"omni_tok{k}"
    dev = w.device

    def buf(name, values):
        """An index tensor input; ``values``: a list, or a function of the split (one tensor
        per rotation phase of ``w``, all of one shape)."""
        ts = [torch.tensor(values(sp) if callable(values) else values, dtype=torch.int64, device=dev)
              for sp in (w.splits if callable(values) else w.splits[:1])]
        if any(t.shape != ts[0].shape for t in ts):
            raise RuntimeError(f"omnicompile: {w.block}: the rotated splits differ in size ({name})")
        consts.append(ts)
        return add_placeholder(graph, f"{tag}_{name}", _fake(ts[0].shape, ts[0].dtype, dev))

    def call(fn, args, shape=None, dtype=None, method=False):
        n = graph.call_method(fn, args) if method else graph.call_function(fn, args)
        n.meta["omni.merged"] = w.block
        n.meta["omni.merge_op"] = w.block      # added by the rewrite (not a copy of a region node)
        if shape is not None:
            n.meta["example_value"] = _fake(shape, dtype, dev)
        return n

    main = ext[w.main]
    main_in = next(t for t in w.inputs if t.name == w.main)
    mev = example_value(main)
    dt = mev.dtype if isinstance(mev, torch.Tensor) else torch.float32
    G = w.groups
    Ps = P // G                 # selections scored (one per sample when G > 1)
    order = {n: i for i, n in enumerate(graph.nodes)}
    at = region[0]
    last_ext = max(ext.values(), key=lambda n: order[n])
    if order[last_ext] > order[region[0]]:
        at = last_ext.next     # a side value computed between the region's nodes
    with graph.inserting_before(at):
        x3 = call("reshape", (main, (main_in.pre, N, main_in.post)), (main_in.pre, N, main_in.post), dt, method=True)
        xs = x3
        if G > 1:   # swapped placement: score whole blocks / frames of a sample, [Ps, N, G * post]
            x4 = call("reshape", (x3, (Ps, G, N, main_in.post)), (Ps, G, N, main_in.post), dt, method=True)
            xt = call("transpose", (x4, 1, 2), (Ps, N, G, main_in.post), dt, method=True)
            xs = call("reshape", (xt, (Ps, N, G * main_in.post)), (Ps, N, G * main_in.post), dt, method=True)
        src, dst, sg, dg = w.split
        s_n, d_n = buf("src", lambda sp: sp[0]), buf("dst", lambda sp: sp[1])
        sg_n = buf("src_group", lambda sp: sp[2]) if sg is not None else None
        dg_n = buf("dst_group", lambda sp: sp[3]) if dg is not None else None
        topk = call(ops.similarity_topk.default, (xs, w.r, s_n, d_n, sg_n, dg_n))
        keep_s = call(operator.getitem, (topk, 1), (Ps, K), torch.int64)
        keep = keep_s
        if G > 1:   # the sample's choice, repeated over its G rows (batch outer, proved)
            k3 = call("unsqueeze", (keep_s, 1), (Ps, 1, K), torch.int64, method=True)
            k3 = call("expand", (k3, Ps, G, K), (Ps, G, K), torch.int64, method=True)
            keep = call("reshape", (k3, (P, K)), (P, K), torch.int64, method=True)
        keep1 = call(operator.getitem, (keep, 0), (K,), torch.int64) if P == 1 else None
        fill_idx = None
        if w.fill == "interpolate":
            skip_s = call(operator.getitem, (topk, 0), (Ps, w.r), torch.int64)
            rg = None
            if sg is not None:
                def table(sp):
                    t = [0] * N
                    for row, g in zip(sp[0] + sp[1], sp[2] + sp[3]):
                        t[row] = g
                    return t
                rg = buf("row_group", table)
            fi = call(interpolation_index, (xs, skip_s, keep_s, d_n, rg, dg_n), (Ps, N), torch.int64)
            if G > 1:
                f3 = call("unsqueeze", (fi, 1), (Ps, 1, N), torch.int64, method=True)
                f3 = call("expand", (f3, Ps, G, N), (Ps, G, N), torch.int64, method=True)
                fi = call("reshape", (f3, (P, N)), (P, N), torch.int64, method=True)
            fill_idx = fi
        mapping: dict[str, fx.Node] = {}
        for t in w.inputs:
            node = ext[t.name]
            ev = example_value(node)
            tdt = ev.dtype if isinstance(ev, torch.Tensor) else dt
            red_shape = list(t.shape)
            red_shape[t.dim] = int(t.layout.value(env_red))
            if t.segs is None:
                t3 = call("reshape", (node, (t.pre, N, t.post)), (t.pre, N, t.post), tdt, method=True)
                idx = keep1 if P == 1 else keep
                m = call(ops.merge.default, (t3, idx, 1), (t.pre, K, t.post), tdt)
            else:
                before, c0, c1, after = t.segs
                parts = []
                if c0:
                    parts.append(buf(f"{t.name}_pre", list(range(c0))))
                parts.append(call(operator.add, (keep1, c0), (K,), torch.int64))
                if c1:
                    parts.append(buf(f"{t.name}_post", list(range(c0 + N, c0 + N + c1))))
                idx = call(torch.cat, (parts,), (c0 + K + c1,), torch.int64) if len(parts) > 1 else parts[0]
                t3 = call("reshape", (node, (before, c0 + N + c1, after)), (before, c0 + N + c1, after), tdt, method=True)
                m = call(ops.merge.default, (t3, idx, 1), (before, c0 + K + c1, after), tdt)
            mapping[t.name] = call("reshape", (m, tuple(red_shape)), red_shape, tdt, method=True)
        for name, node in ext.items():
            mapping.setdefault(name, node)
        for n in region:
            args, kwargs = _materialize_refs(w.templates[n.name], mapping, env_red)
            c = graph.create_node(n.op, n.target, args, kwargs, name=f"{n.name}_m")
            c.meta = {kk: v for kk, v in n.meta.items() if kk in ("nn_module_stack", "stack_trace", "source_fn_stack")}
            c.meta["example_value"] = w.reduced[n.name]
            c.meta["omni.merged"] = w.block
            mapping[n.name] = c
        new_states = []
        tagged_out = {o.name for o in w.outputs}
        for j, o in enumerate(w.outputs):
            comp = mapping[o.name]
            if w.fill == "residual":   # rows of output - input, the input being the merged main stream
                comp = call(operator.sub, (comp, mapping[w.main]), w.reduced[o.name].shape, o.dtype)
            o3 = call("reshape", (comp, (P, K, o.post)), (P, K, o.post), o.dtype, method=True)
            if w.fill == "interpolate":   # every row from a computed one: itself, or its matched dst
                u3 = call(ops.merge.default, (o3, fill_idx, 1), (P, N, o.post), o.dtype)
                u = call("reshape", (u3, tuple(o.shape)), o.shape, o.dtype, method=True)
                by_name[o.name].replace_all_uses_with(u, delete_user_cb=lambda user: user not in rset)
                continue
            c3 = call("reshape", (caches[j], (P, N, o.post)), (P, N, o.post), o.dtype, method=True)
            u3 = call(ops.unmerge.default, (o3, keep, c3), (P, N, o.post), o.dtype)
            u = call("reshape", (u3, tuple(o.shape)), o.shape, o.dtype, method=True)
            new_states.append(u)
            if w.fill == "residual":
                u = call(operator.add, (main, u), o.shape, o.dtype)
            by_name[o.name].replace_all_uses_with(u, delete_user_cb=lambda user: user not in rset)
    for n in region:
        if n.name not in tagged_out and any(u not in rset for u in n.users):
            n.replace_all_uses_with(mapping[n.name], delete_user_cb=lambda user: user not in rset)
    for n in reversed(region):
        if n.users:
            raise RuntimeError(f"omnicompile: {n.name} still has users after the token rewrite")
        graph.erase_node(n)
    return new_states


def interpolation_index(x: torch.Tensor, skip_idx: torch.Tensor, keep_idx: torch.Tensor, dst_idx: torch.Tensor,
                        row_group: Optional[torch.Tensor] = None,
                        dst_group: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``merge_fill="interpolate"``: for each of the ``N`` rows of ``x [B, N, C]`` (the scored
    view), the position in ``keep_idx [B, K]`` of the computed row it takes its value from —
    itself when kept; for a skipped row (``skip_idx [B, r]``), the dst row it matches best
    (highest cosine similarity, within its patch when ``row_group [N]`` / ``dst_group [D]``
    are given; the first dst on ties): ToMe's unmerge-by-copy of the current step's output.
    Dst rows are never skipped, so every row maps to a kept row.  Plain torch (traceable; the
    ``r x D`` similarity matrix is materialised)."""
    b, n, _ = x.shape
    xf = x.double() if x.dtype == torch.float64 else x.float()
    xn = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    xs = torch.gather(xn, 1, skip_idx.unsqueeze(-1).expand(b, skip_idx.shape[1], xn.shape[-1]))
    sim = xs @ xn[:, dst_idx].transpose(1, 2)                        # [B, r, D]
    if row_group is not None:
        sim = sim.masked_fill(row_group[skip_idx].unsqueeze(-1) != dst_group, float("-inf"))
    match = dst_idx[sim.argmax(dim=-1)]                              # [B, r] rows in [0, N)
    k = keep_idx.shape[1]
    pos = torch.zeros(b, n, dtype=torch.int64, device=x.device).scatter(
        1, keep_idx, torch.arange(k, device=x.device).expand(b, k))
    source = torch.arange(n, device=x.device).expand(b, n).scatter(1, skip_idx, match)
    return torch.gather(pos, 1, source)


def _materialize_refs(obj, mapping: dict, env: dict):
    def f(a):
        if isinstance(a, Ref):
            return mapping[a.name]
        if isinstance(a, Size):
            return int(a.layout.value(env))
        return a
    return map_args(obj, f)
