"""The proof of a re-specialised region, and its transfer to identical blocks.

See "Re-specialisation and its proof" in the package docstring: :func:`prove_region` checks a
traced region's symbolic shapes and templates against Dynamo's recorded shapes at the original
size and against a concrete fake run at the reduced size.  The first wrappable block of a list
is traced; the next ones, when :func:`align_blocks` maps them onto it node for node, reuse its
trace through :class:`Aligned` and are proved again on their own nodes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from ..common import example_value, node_signature
from .layout import OP_FAILURES, VIEWS, Refuse, map_args, materialize, target_name

if TYPE_CHECKING:
    from .trace import Tracer

__all__ = ["prove_region", "Aligned", "align_blocks"]


def prove_region(nodes, fv, templates, tagged, external, sym, env_orig, env_red) -> dict:
    """Check a re-specialised region: each node's symbolic shape (``fv``) evaluated at the
    original size equals the shape Dynamo recorded, its arguments (``templates``) evaluated
    there equal the original ones (views, expands, indexing and splits are checked through
    their output shapes instead: their argument forms are normalised), and a concrete fake run
    of the templates at the reduced size gives every node its symbolic shape evaluated at that
    size.  Returns the reduced fake values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    orig_sub = {sym[a]: o for a, o in env_orig.items()}
    red_sub = {sym[a]: r for a, r in env_red.items()}

    def shapes(v, sub):
        flat = v if isinstance(v, (tuple, list)) else [v]
        return [tuple(int(sympy.sympify(sz if isinstance(sz, int) else sz.node.expr).xreplace(sub)) for sz in t.shape)
                if isinstance(t, torch.Tensor) else None for t in flat]

    def real_shapes(v):
        flat = v if isinstance(v, (tuple, list)) else [v]
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in flat]

    normalised = VIEWS | {"expand", "unflatten", "getitem", "setitem", "split", "split_with_sizes"}
    for n in nodes:
        want = example_value(n)
        if want is None:
            continue
        if shapes(fv[n], orig_sub) != real_shapes(want):
            raise Refuse("merge_proof", f"{n.name}: symbolic shape at the original size "
                         f"{shapes(fv[n], orig_sub)} differs from the graph's {real_shapes(want)}", n)
        tmpl = materialize(templates[n], {m: m for m in list(fv) + list(external)}, env_orig)
        if target_name(n) not in normalised and _norm_args(tmpl) != _norm_args((n.args, dict(n.kwargs))):
            raise Refuse("merge_proof", f"{n.name}: re-specialised arguments differ at the original size", n)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    vals: dict = {}
    with mode:
        for a in external:
            ev = example_value(a)
            if isinstance(ev, torch.Tensor):
                sizes = list(ev.shape)
                tags = tagged.get(a, {})
                for d, lay in tags.items():
                    sizes[d] = int(lay.value(env_red))
                vals[a] = (torch.empty(sizes, dtype=ev.dtype, device=ev.device) if tags else
                           torch.empty_strided(tuple(ev.shape), tuple(ev.stride()), dtype=ev.dtype, device=ev.device))
            else:
                vals[a] = ev
        for n in nodes:
            a, k = materialize(templates[n], vals, env_red)
            try:
                out = n.target(*a, **k) if n.op == "call_function" else getattr(a[0], n.target)(*a[1:], **k)
            except OP_FAILURES as e:   # deliberate: torch refusing the op at the reduced size
                raise Refuse("merge_proof", f"{n.name} fails at the reduced size: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:200]}", n) from None
            vals[n] = out
            if shapes(fv[n], red_sub) != real_shapes(out):
                raise Refuse("merge_proof", f"{n.name}: shape at the reduced size {real_shapes(out)} "
                             f"differs from the symbolic one {shapes(fv[n], red_sub)}", n)
    return {n: vals[n] for n in nodes}


class Aligned:
    """A traced region transferred to a structurally identical block (same op sequence and
    constants, node for node): the symbolic shapes and templates are the traced block's, the
    proof is re-run on the new block's own nodes and shapes."""

    def __init__(self, tr: "Tracer", amap: dict):
        self.tr = tr
        self.amap = amap
        self.nodes = [amap[n] for n in tr.nodes]
        self.back = {b: a for a, b in amap.items()}
        self.fv = {amap[a]: v for a, v in tr.fv.items() if a in amap}
        self.templates = {amap[a]: map_args(t, lambda x: amap.get(x, x) if isinstance(x, fx.Node) else x)
                          for a, t in tr.templates.items()}
        self.tagged = {amap[a]: v for a, v in tr.tagged.items() if a in amap}
        self.external = [amap[a] for a in tr.external]

    def is_sym(self, s) -> bool:
        return self.tr.is_sym(s)

    def has_sym(self, t) -> bool:
        return self.tr.has_sym(t)

    def out_layouts(self, n):
        return self.tr.out_layouts(self.back[n])

    def prove(self) -> dict:
        return prove_region(self.nodes, self.fv, self.templates, self.tagged, self.external, self.tr.sym,
                            self.tr.env_orig, self.tr.env_red)


def align_blocks(a_nodes: Sequence[fx.Node], b_nodes: Sequence[fx.Node], region: Sequence[fx.Node]) -> Optional[dict]:
    """Node-for-node map of block ``a`` onto block ``b`` (same signatures with constants, same
    dataflow), extended to the externals ``region`` reads; None when they differ."""
    if len(a_nodes) != len(b_nodes):
        return None
    amap: dict = {}
    for x, y in zip(a_nodes, b_nodes):
        if node_signature(x, constants=True) != node_signature(y, constants=True):
            return None
        amap[x] = y
    inside = set(a_nodes)
    for x in region:
        y = amap[x]
        if len(x.all_input_nodes) != len(y.all_input_nodes):
            return None
        for p, q in zip(x.all_input_nodes, y.all_input_nodes):
            if p in inside:
                if amap[p] is not q:
                    return None
            elif amap.setdefault(p, q) is not q:
                return None
            else:
                ep, eq = example_value(p), example_value(q)
                if isinstance(ep, torch.Tensor) != isinstance(eq, torch.Tensor) or (
                        isinstance(ep, torch.Tensor) and (ep.shape != eq.shape or ep.dtype != eq.dtype)):
                    return None
    return amap


def _norm_args(obj):
    def f(a):
        if isinstance(a, torch.Size):
            return tuple(a)
        return a
    out = map_args(obj, f)
    return repr(out)
