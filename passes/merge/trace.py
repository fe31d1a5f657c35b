"""The symbolic tracer: interpret a region with the merged axis size a symbol.

See "Re-specialisation and its proof" in the package docstring.  :func:`trace_region` runs a
:class:`Tracer` over a region's nodes under a ``FakeTensorMode`` whose ``ShapeEnv`` holds one
symbol per axis, gives every symbolic dim a :class:`~omnicompile.passes.merge.layout.Layout`
and records each node's arguments as a template (integer sizes that depend on the axis become
:class:`~omnicompile.passes.merge.layout.Size`); :meth:`Tracer.prove` then checks the templates
(:func:`~omnicompile.passes.merge.prove.prove_region`).  Anything the rules cannot follow
raises :class:`~omnicompile.passes.merge.layout.Refuse`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from ..common import example_value
from .layout import (OP_FAILURES, VIEWS, Layout, Refuse, Size, int_args, materialize,
                                             target_name)
from .prove import prove_region

__all__ = ["Tracer", "trace_region"]


_DIM_ONLY = {   # int arguments are dims, counts or flags, never sizes
    "transpose", "permute", "unsqueeze", "squeeze", "softmax", "log_softmax", "flatten", "sum", "mean",
    "amax", "amin", "max", "min", "argmax", "argmin", "norm", "var", "std", "movedim", "dropout",
    "gelu", "silu", "relu", "linear", "scaled_dot_product_attention", "to", "type", "float", "half",
    "bfloat16", "contiguous", "type_as", "add", "mul", "sub", "truediv", "div", "neg", "pow", "exp", "sin",
    "cos", "rsqrt", "sqrt", "tanh", "sigmoid", "clone", "empty_like", "zeros_like", "ones_like",
    "where", "masked_fill", "baddbmm", "bmm", "matmul", "einsum", "stack", "cat", "concat", "iadd",
    "imul", "mish", "erf", "log", "abs", "square", "floordiv", "mod", "getitem", "setitem", "chunk",
    "unbind", "split", "split_with_sizes", "layer_norm", "rms_norm", "group_norm", "reciprocal", "clamp",
    "clamp_min", "clamp_max", "__matmul__", "_assert_tensor_metadata", "detach", "requires_grad_",
    "cpu", "cuda", "view_as", "reshape_as", "expand_as", "addcmul", "lerp", "softplus", "hardswish",
    "leaky_relu", "elu", "glu", "logsumexp", "size", "dim", "numel", "unflatten", "expand",
}
#: ops whose result depends on where a row sits along a dim: on the merged rows they would mean
#: something else (a flip of the kept rows is not the kept rows of a flip)
_POSITIONAL = {"flip", "fliplr", "flipud", "roll", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp",
               "triu", "tril", "diff", "sort", "argsort", "topk", "kthvalue", "gather", "scatter", "scatter_add",
               "index_select", "take_along_dim", "index_add", "index_copy", "diagonal", "diag", "trace",
               "searchsorted", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "pad",
               "interpolate", "unfold", "fold", "pixel_shuffle", "pixel_unshuffle", "rot90", "avg_pool1d",
               "avg_pool2d", "max_pool1d", "max_pool2d"}
_FACTORIES = {"arange", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "new_zeros", "new_ones",
              "new_empty", "new_full", "tensor", "linspace", "eye", "repeat", "repeat_interleave", "tile",
              "narrow", "roll", "pad", "interpolate", "fold", "unfold", "index_select", "gather", "scatter"}


class Tracer:
    """Interpret ``nodes`` (a region of ``gm``) with symbolic axis sizes (see the package docstring)."""

    def __init__(self, nodes: Sequence[fx.Node], axes: dict[str, tuple[int, int]],
                 tagged: dict[fx.Node, dict[int, Layout]]):
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        self.nodes = list(nodes)
        self.inside = set(self.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.axes = dict(axes)
        self.tagged = tagged
        self.se = ShapeEnv(duck_shape=False)
        self.mode = FakeTensorMode(shape_env=self.se, allow_non_fake_inputs=True)
        self.mode.cache_enabled = False   # ~2x faster for one-shot interpretation
        self.sym: dict[str, sympy.Symbol] = {}
        self.symint: dict[str, Any] = {}
        for a, (orig, red) in self.axes.items():
            s = self.se.create_symbol(red, source=ConstantSource(f"omni_{a}"), dynamic_dim=DimDynamic.DYNAMIC)
            self.sym[a] = s
            self.symint[a] = self.se.create_symintnode(s, hint=red)
        self.env_orig = {a: o for a, (o, _) in self.axes.items()}
        self.env_red = {a: r for a, (_, r) in self.axes.items()}
        self.env_sym = dict(self.sym)
        self.reg: dict = {}                       # sympy expr -> Layout
        self.fv: dict[fx.Node, Any] = {}          # node -> fake value (symbolic)
        self.templates: dict[fx.Node, tuple] = {}
        self.pending: dict[tuple, Layout] = {}    # (output index, dim) -> layout, for the current node
        self.external: list[fx.Node] = []

    # -------------------------------------------------------------- helpers
    def _register(self, lay: Layout, node=None) -> None:
        key = sympy.expand(lay.value(self.env_sym))
        old = self.reg.get(key)
        if old is not None and old != lay:
            raise Refuse("merge_layout_conflict",
                         f"rows of size {key} have two layouts ({old} and {lay}) in one region", node)
        self.reg[key] = lay

    def dim_layout(self, size) -> "Layout | int":
        """The layout of a dim of a fake tensor (an int where it does not depend on the axis)."""
        if isinstance(size, int):
            return size
        expr = sympy.expand(size.node.expr)
        if not expr.free_symbols:
            return int(expr)
        lay = self.reg.get(expr)
        if lay is None:
            raise Refuse("merge_unknown_layout", f"a dim of size {expr} has no known row layout")
        return lay

    def _orig(self, lay) -> int:
        return lay if isinstance(lay, int) else int(lay.value(self.env_orig))

    def _layouts_of(self, t) -> list:
        return [self.dim_layout(s) for s in t.shape]

    def _collisions(self) -> set[int]:
        return {int(k.xreplace({self.sym[a]: o for a, o in self.env_orig.items()})) for k in self.reg}

    # -------------------------------------------------------------- inputs
    def _input_fake(self, n: fx.Node):
        ev = example_value(n)
        with self.mode:
            if isinstance(ev, torch.Tensor):
                tags = self.tagged.get(n, {})
                if tags:
                    sizes = list(ev.shape)
                    for d, lay in tags.items():
                        if int(lay.value(self.env_orig)) != sizes[d]:
                            raise Refuse("merge_bad_input", f"input {n.name} dim {d} is {sizes[d]}, not {lay}", n)
                        self._register(lay, n)
                        sizes[d] = lay.value(self.symint)
                    return torch.empty(sizes, dtype=ev.dtype, device=ev.device)
                return torch.empty_strided(tuple(ev.shape), tuple(ev.stride()), dtype=ev.dtype, device=ev.device)
        if ev is None and n.op == "get_attr":
            return None
        if isinstance(ev, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            return ev
        raise Refuse("merge_input", f"input {n.name} of the region is not a tensor or a constant", n)

    # -------------------------------------------------------------- run
    def run(self) -> None:
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in self.inside and a not in self.fv:
                    self.external.append(a)
                    self.fv[a] = self._input_fake(a)
            try:
                self._run_node(n)
            except Refuse as e:
                if e.node is None:
                    e.node = n
                e.tracer = self
                raise
            except OP_FAILURES as e:
                # deliberate: torch refusing the op at the symbolic size (a failed broadcast, a
                # shape it cannot decide) is a refusal of the region; other exceptions are our bugs
                err = Refuse("merge_trace_failed", f"{n.name} ({target_name(n)}): "
                             f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", n)
                err.tracer = self
                raise err from None

    def _run_node(self, n: fx.Node) -> None:
        if n.op in ("placeholder", "output"):
            raise Refuse("merge_region", f"region contains {n.op} {n.name}", n)
        if n.op == "call_module":
            raise Refuse("merge_region", f"{n.name} calls a module", n)
        if n.op == "get_attr":
            raise Refuse("merge_region", f"{n.name} reads a module attribute inside the region", n)
        self.pending = {}
        args, kwargs = self._rewrite(n)
        self.templates[n] = (args, kwargs)
        a, k = materialize((args, kwargs), self.fv, self.symint)
        with self.mode:
            if n.op == "call_function":
                out = n.target(*a, **k)
            else:
                out = getattr(a[0], n.target)(*a[1:], **k)
        self.fv[n] = out
        flat = out if isinstance(out, (tuple, list)) else [out]
        for i, t in enumerate(flat):
            if not isinstance(t, torch.Tensor):
                continue
            for d, s in enumerate(t.shape):
                if isinstance(s, int):
                    continue
                expr = sympy.expand(s.node.expr)
                if not expr.free_symbols:
                    continue
                lay = self.pending.get((i, d))
                if lay is not None:
                    self._register(lay, n)
                elif expr not in self.reg:
                    raise Refuse("merge_unknown_layout",
                                 f"{n.name} ({target_name(n)}) makes rows of size {expr} with no known layout", n)

    # -------------------------------------------------------------- rules
    def _fake(self, a):
        return self.fv[a] if isinstance(a, fx.Node) else a

    def _rewrite(self, n: fx.Node) -> tuple:
        name = target_name(n)
        args, kwargs = n.args, dict(n.kwargs)
        x = self._fake(args[0]) if args else None
        symbolic_in = any(isinstance(self.fv.get(a), torch.Tensor) and self.has_sym(self.fv[a])
                          for a in n.all_input_nodes)
        if not symbolic_in:
            if name in _FACTORIES or name not in _DIM_ONLY:
                bad = set(int_args((args, kwargs))) & self._collisions()
                if bad and name not in VIEWS and name != "expand":
                    raise Refuse("merge_ambiguous_int",
                                 f"{n.name} ({name}) takes the integer {sorted(bad)[0]}, the size of a merged axis", n)
            return args, kwargs
        if name in VIEWS and isinstance(x, torch.Tensor):
            if len(args) == 2 and isinstance(args[1], (torch.dtype,)):
                return args, kwargs
            return self._view(n, x)
        if name == "unflatten":
            return self._unflatten(n, x)
        if name == "flatten":
            self._view_layouts(n, x, list(example_value(n).shape))
            return args, kwargs
        if name == "expand":
            return self._expand(n, x)
        if name == "getitem" and isinstance(x, torch.Tensor):
            idx, outs = self._index(n, x, args[1])
            return (args[0], idx), kwargs
        if name == "setitem" and isinstance(x, torch.Tensor):
            idx, _ = self._index(n, x, args[1])
            return (args[0], idx, *args[2:]), kwargs
        if name in ("split", "split_with_sizes") and isinstance(x, torch.Tensor):
            return self._split(n, x)
        if name in ("chunk", "unbind", "narrow"):
            dim = self._dim_arg(n, name)
            if dim is not None and self.is_sym(x.shape[dim]):
                raise Refuse("merge_split_axis", f"{n.name} ({name}) cuts the merged rows", n)
            return args, kwargs
        if name in ("cat", "concat"):
            return self._cat(n)
        if name in _POSITIONAL:
            self._positional(n, name)
        if name in ("layer_norm", "rms_norm"):
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            k = len(shape) if isinstance(shape, (tuple, list)) else 1
            if any(self.is_sym(s) for s in x.shape[x.dim() - k:]):
                raise Refuse("merge_norm_axis", f"{n.name} normalises over the merged rows", n)
            return args, kwargs
        if name in _FACTORIES or name not in _DIM_ONLY:
            bad = set(int_args((args, kwargs))) & self._collisions()
            if bad:
                raise Refuse("merge_ambiguous_int",
                             f"{n.name} ({name}) takes the integer {sorted(bad)[0]}, the size of a merged axis", n)
        return args, kwargs

    def _positional(self, n: fx.Node, name: str) -> None:
        """Refuse a position-dependent op unless the dims it acts on (``dim``/``dims``) are
        given and none of them holds merged rows."""
        dims = n.kwargs.get("dims", n.kwargs.get("dim"))
        if dims is None and name in ("flip", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort",
                                     "argsort", "gather", "index_select", "take_along_dim") and len(n.args) > 1:
            dims = n.args[1]
        if dims is None and name == "roll" and len(n.args) > 2:
            dims = n.args[2]
        if dims is None and name in ("sort", "argsort", "diff"):
            dims = -1
        for a in n.all_input_nodes:
            t = self.fv.get(a)
            if not isinstance(t, torch.Tensor) or not self.has_sym(t):
                continue
            if not isinstance(dims, (int, tuple, list)) or isinstance(dims, bool):
                raise Refuse("merge_positional", f"{n.name} ({name}) depends on where rows sit", n)
            for d in (dims if isinstance(dims, (tuple, list)) else [dims]):
                if not isinstance(d, int) or self.is_sym(t.shape[d % t.dim()]):
                    raise Refuse("merge_positional", f"{n.name} ({name}) depends on where the merged rows sit", n)

    def has_sym(self, t) -> bool:
        return any(self.is_sym(s) for s in t.shape)

    @staticmethod
    def is_sym(s) -> bool:
        return not isinstance(s, int) and bool(sympy.sympify(s.node.expr).free_symbols)

    def _dim_arg(self, n, name):
        pos = {"chunk": 2, "unbind": 1, "narrow": 1}[name]
        d = n.kwargs.get("dim", n.args[pos] if len(n.args) > pos else 0)
        x = self._fake(n.args[0])
        return d % x.dim() if isinstance(d, int) else None

    # views ---------------------------------------------------------------
    def _view_layouts(self, n, x, out_orig: list[int]) -> list:
        ins = self._layouts_of(x)
        in_orig = [self._orig(l) for l in ins]
        if math.prod(in_orig) != math.prod(out_orig):
            raise Refuse("merge_view", f"{n.name}: view of {in_orig} as {out_orig}", n)
        outs: list = list(out_orig)
        for gi, gj in _groups(in_orig, out_orig):
            if all(isinstance(ins[i], int) for i in gi):
                continue
            seq: list = []
            for i in gi:
                lay = ins[i]
                if isinstance(lay, int):
                    if lay != 1:
                        seq.append(["c", lay])
                elif lay.composite:
                    seq.append(["comp", lay, self._orig(lay)])
                else:
                    for f in lay.segs[0]:
                        seq.append(["c", f] if isinstance(f, int) else ["s", f, self.env_orig[f]])
            for j in gj:
                need = out_orig[j]
                fac: list = []
                while need > 1:
                    if not seq:
                        raise Refuse("merge_view", f"{n.name}: cannot regroup the rows", n)
                    head = seq[0]
                    if head[0] == "c":
                        c = head[1]
                        if need % c == 0:
                            fac.append(c)
                            need //= c
                            seq.pop(0)
                        elif c % need == 0:
                            fac.append(need)
                            head[1] = c // need
                            need = 1
                        else:
                            raise Refuse("merge_view", f"{n.name}: a view mixes merged rows with other rows", n)
                    elif head[0] == "s":
                        if need % head[2]:
                            raise Refuse("merge_view", f"{n.name}: a view splits the merged axis", n)
                        fac.append(head[1])
                        need //= head[2]
                        seq.pop(0)
                    else:
                        if fac or need != head[2]:
                            raise Refuse("merge_view", f"{n.name}: a view regroups text and image rows", n)
                        outs[j] = head[1]
                        seq.pop(0)
                        need = 1
                        fac = None
                        break
                if fac is not None:
                    outs[j] = Layout.make([fac])
            if any(h[0] != "c" or h[1] != 1 for h in seq):
                raise Refuse("merge_view", f"{n.name}: cannot regroup the rows", n)
        for j, lay in enumerate(outs):
            if isinstance(lay, Layout):
                self.pending[(0, j)] = lay
        return outs

    def _view(self, n, x) -> tuple:
        out_orig = list(example_value(n).shape)
        outs = self._view_layouts(n, x, out_orig)
        sizes = tuple(Size(l) if isinstance(l, Layout) else l for l in outs)
        if n.op == "call_method":
            return (n.args[0], *sizes), {}
        return (n.args[0], sizes), {}

    def _unflatten(self, n, x) -> tuple:
        out_orig = list(example_value(n).shape)
        outs = self._view_layouts(n, x, out_orig)
        args = list(n.args)
        dim = args[1] if len(args) > 1 else n.kwargs["dim"]
        dim = dim % x.dim()
        k = len(args[2] if len(args) > 2 else n.kwargs["sizes"])
        sizes = tuple(Size(l) if isinstance(l, Layout) else l for l in outs[dim:dim + k])
        return (args[0], dim, sizes), {}

    def _expand(self, n, x) -> tuple:
        sizes = list(n.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = list(sizes[0])
        if "size" in n.kwargs:
            sizes = list(n.kwargs["size"])
        ins = self._layouts_of(x)
        off = len(sizes) - len(ins)
        coll = self._collisions()
        out = []
        for j, v in enumerate(sizes):
            i = j - off
            lay = ins[i] if i >= 0 else 1
            if isinstance(lay, Layout):
                if v != -1 and v != self._orig(lay):
                    raise Refuse("merge_expand", f"{n.name}: expands merged rows", n)
                out.append(Size(lay) if v != -1 else -1)
            else:
                if isinstance(v, int) and lay == 1 and v in coll:
                    raise Refuse("merge_ambiguous_int",
                                 f"{n.name}: expands to {v}, the size of a merged axis", n)
                out.append(v)
        return (n.args[0], *out), {}

    # index / split / cat ------------------------------------------------------
    def _cut(self, n, lay: "Layout | int", bounds: list[int]) -> list:
        """Cut a dim at the original positions ``bounds`` (0 and the size included): the
        layouts of the pieces and the materialisable bounds."""
        if isinstance(lay, int):
            return [(b, None) for b in bounds]
        cum = [0]
        for v in lay.seg_values(self.env_orig):
            cum.append(cum[-1] + int(v))
        out = []
        for b in bounds:
            if b not in cum:
                raise Refuse("merge_split_axis", f"{n.name}: cuts the merged rows at {b}", n)
            k = cum.index(b)
            pre = Layout.make(lay.segs[:k]) if k else 0
            out.append((Size(pre) if isinstance(pre, Layout) else pre, k))
        return out

    def _piece(self, lay: Layout, k1: int, k2: int) -> "Layout | int":
        return Layout.make(lay.segs[k1:k2])

    def _index(self, n, x, idx) -> tuple:
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(1 for it in items if it is Ellipsis) > 1:
            raise Refuse("merge_index", f"{n.name}: two ellipses", n)
        ins = self._layouts_of(x)
        if not any(isinstance(l, Layout) for l in ins):
            return idx, None
        used = sum(1 for it in items if it is not None and it is not Ellipsis)
        d = od = 0
        new_items: list = []
        for it in items:
            if it is Ellipsis:
                new_items.append(Ellipsis)
                k = x.dim() - used
                d += k
                od += k
                continue
            if it is None:
                new_items.append(None)
                od += 1
                continue
            lay = ins[d] if d < len(ins) else None
            if isinstance(it, (fx.Node, torch.Tensor, list)):
                raise Refuse("merge_index", f"{n.name}: advanced indexing of merged rows", n)
            if isinstance(it, int):
                if isinstance(lay, Layout):
                    raise Refuse("merge_index", f"{n.name}: picks one merged row", n)
                new_items.append(it)
                d += 1
                continue
            if not isinstance(it, slice):
                raise Refuse("merge_index", f"{n.name}: index {it!r}", n)
            if isinstance(lay, Layout):
                total = self._orig(lay)
                if it.step not in (None, 1):
                    raise Refuse("merge_index", f"{n.name}: strided slice of merged rows", n)
                start, stop, _ = slice(it.start, it.stop).indices(total)
                (s_t, k1), (e_t, k2) = self._cut(n, lay, [start, stop])
                piece = self._piece(lay, k1, k2)
                if isinstance(piece, Layout):
                    self.pending[(0, od)] = piece
                new_items.append(slice(s_t if start else None, e_t if stop != total else None, None))
            else:
                new_items.append(it)
            d += 1
            od += 1
        return (tuple(new_items) if isinstance(idx, tuple) else new_items[0]), None

    def _split(self, n, x) -> tuple:
        args = list(n.args)
        sizes = args[1] if len(args) > 1 else n.kwargs.get("split_size_or_sections", n.kwargs.get("split_sizes"))
        dim = args[2] if len(args) > 2 else n.kwargs.get("dim", 0)
        dim %= x.dim()
        lay = self.dim_layout(x.shape[dim])
        if not isinstance(lay, Layout):
            return n.args, dict(n.kwargs)
        if isinstance(sizes, int):
            raise Refuse("merge_split_axis", f"{n.name}: splits the merged rows in equal parts", n)
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        cuts = self._cut(n, lay, bounds)
        new_sizes = []
        for i in range(len(sizes)):
            piece = self._piece(lay, cuts[i][1], cuts[i + 1][1])
            if isinstance(piece, Layout):
                self.pending[(i, dim)] = piece
                new_sizes.append(Size(piece))
            else:
                new_sizes.append(piece)
        return (args[0], new_sizes, dim), {}

    def _cat(self, n) -> tuple:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        fakes = [self._fake(t) for t in tensors]
        nd = fakes[0].dim()
        dim %= nd
        lays = [self.dim_layout(t.shape[dim]) for t in fakes]
        if any(isinstance(l, Layout) for l in lays):
            segs = []
            for l in lays:
                segs.extend(l.segs if isinstance(l, Layout) else [(l,)])
            out = Layout.make(segs)
            if isinstance(out, Layout):
                self.pending[(0, dim)] = out
        return n.args, dict(n.kwargs)

    # -------------------------------------------------------------- proof
    def prove(self) -> dict[fx.Node, Any]:
        """See :func:`prove_region`."""
        for a in self.axes:
            if self.sym[a] in self.se.replacements:
                raise Refuse("merge_specialized", f"the region specialises the {a} size")
        return prove_region(self.nodes, self.fv, self.templates, self.tagged, self.external, self.sym,
                            self.env_orig, self.env_red)

    def out_layouts(self, n: fx.Node) -> list[dict[int, Layout]]:
        v = self.fv[n]
        flat = v if isinstance(v, (tuple, list)) else [v]
        res = []
        for t in flat:
            d: dict[int, Layout] = {}
            if isinstance(t, torch.Tensor):
                for i, s in enumerate(t.shape):
                    lay = self.dim_layout(s)
                    if isinstance(lay, Layout):
                        d[i] = lay
            res.append(d)
        return res


def _groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Partition two shapes of equal numel into groups of consecutive dims with equal products."""
    out = []
    i = j = 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            out.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1:
            out.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            raise Refuse("merge_view", f"cannot group {a} and {b}")
        gi, gj = [i], [j]
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    raise Refuse("merge_view", f"cannot group {a} and {b}")
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(b):
                    raise Refuse("merge_view", f"cannot group {a} and {b}")
                gj.append(j)
                pb *= b[j]
                j += 1
        out.append((gi, gj))
    return out


def trace_region(nodes: Sequence[fx.Node], axes: dict[str, tuple[int, int]],
                 tagged: dict[fx.Node, dict[int, Layout]]) -> Tracer:
    """Trace ``nodes`` with the given inputs tagged; raises ``Refuse``."""
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)   # failed broadcasts are expected while searching
    try:
        t = Tracer(nodes, axes, tagged)
        t.run()
        return t
    finally:
        quiet.setLevel(level)
