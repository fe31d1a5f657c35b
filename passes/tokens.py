"""Token, frame and block caches: run a block on the less redundant rows of one axis only, and
fill the skipped rows from the block's output of the previous step (OmniCache, ``002_…``
§3.2–3.3 and Appendix A: reuse, not ToMe's averaging, so row order and positions stay exact).

Axes (the *roles* come from the graph, see "Placement" below):

* ``token`` — tokens of a frame (image models; the spatial layers of video models; all tokens of
  a joint spatio-temporal model such as Wan), split by :func:`~omnicompile.kernels.token_split`
  (one dst per 2x2 cell of the patch grid; ``patch=k`` matches within k x k patches);
* ``frame`` — the frames of a video, in its *spatial* layers (rows ``B*F`` of ``[B*F, N, C]``),
  split by :func:`~omnicompile.kernels.frame_split` (every other frame is dst);
* ``block`` — the spatial positions of a video, in its *temporal* layers (rows ``B*N`` of
  ``[B*N, F, C]``), split like tokens on the patch grid.

A wrapped *region* is the part of a block that depends on its main stream input (the rest —
AdaLN tables from the timestep, text key/value projections — does not see the merged rows and
runs in full), cut before the feed-forward sub-layer when ``merge_ffn=False`` (at the point where
only the residual stream carries merged rows on).  With ``N`` rows on the axis and
``r = floor(ratio * N)`` rows to skip (at most the src rows):

1. ``similarity_topk`` scores the region's main input (viewed ``[P, N, Q]``: ``P`` selections,
   e.g. one per frame for the token axis) and returns ``keep_idx [P, N - r]``;
2. ``merge`` gathers every region input indexed by the axis with the same indices — the main
   stream, and side inputs whose rows line up with it (AdaLN tables repeated per frame, text
   states repeated per frame, rotary tables ``[T + N, D]`` whose text rows are kept whole);
3. the region runs on ``N - r`` rows: a copy of its nodes whose integer size arguments
   (``view``/``reshape``/``expand``/``unflatten`` sizes, split sizes, slice bounds) are
   re-specialised to the reduced size;
4. ``unmerge`` writes the computed rows of each output indexed by the axis into that output's
   value from the previous step (a state tensor), which becomes the new state.  Outputs not
   indexed by the axis (Flux's text stream) pass through.  With ``fill="residual"`` the state
   is ``output - input`` per row and a skipped row gets this step's input plus it (ToMeSD-style
   reuse of the sub-layer's contribution; needs the output to be the input's residual stream).

The first call of a generation (or after ``reset``) runs the *full* variant: nothing merged,
the state tensors are the region outputs themselves.

Staleness: rotation and refresh.  With a fixed split a src row similar to its dst (background)
is skipped at every step and keeps its value from the full first call — pure-noise features —
for the whole generation.  With ``rotate`` (``merge_rotate``) a wrap holds one split per phase
(``Wrap.splits``): the dst position in each 2x2 cell cycles through offsets 0, 3, 1, 2
(``ROTATION``; the frame axis alternates the dst parity, the packed 1-D axis cycles 0, 2, 1, 3),
so every row is dst — computed — at least once every 4 (frames: 2) calls.  All phases have one
shape (phases whose lists differ in length, e.g. the odd parity of an odd frame count, are
dropped), so one merged graph serves them: the split index tensors are graph inputs and the
host passes the phase's set (``apply_token_cache(..., phases=[])``), no host sync.  The runtime
counts the calls of a slot in a generation (``k``, 0 = the full first call: the step index with
no step policy, computed steps with one) and uses phase ``k % lcm(phases)``; with
``merge_refresh=N`` the calls with ``k % N == 0`` run the full variant and re-seed every row.
Measured on the shipped Latte model (``bench/video_bench.py``, 20 steps, batched CFG, PSNR vs
uncached, fixed split -> rotated -> rotated + refresh 2, fill output / residual): token 0.25
17.5 -> 24.4 -> 29.8 / 21.1 -> 24.5 -> 30.1 dB; frame 0.3 19.5 -> 36.2 -> 38.8 / 22.5 -> 40.2
-> 43.3 dB; block 0.4 15.6 -> 30.4 -> 39.3 / 28.0 -> 41.5 -> 46.9 dB; the fixed split also
loses frame accuracy (0.86 / 0.97 / 0.69 with fill output), every rotated row keeps 1.00.
Hence ``merge_rotate=True`` by default.  A refresh every N calls gives back 1/N of the savings,
and at equal FLOPs a lower ratio does better (all three caches, fill residual: 0.25 41.2 dB vs
0.5 + refresh 2 40.5 dB, both 0.95 of the FLOPs), so ``merge_refresh`` defaults to None.

Re-specialisation and its proof.  Dynamo's graph bakes concrete sizes into its arguments.
The tracer interprets the region under a ``FakeTensorMode`` with a ``ShapeEnv`` in which the
axis size is a symbol (hint: the reduced size), so every node's shape is a sympy expression.
Each symbolic dim carries a *layout*: a list of segments, each a row-major product of factors
(integers, or the axis symbol) — ``[B, n]`` is the ``B*N`` rows of a temporal layer (batch
outer), ``[[T], [n]]`` the text-then-image rows of Flux's joint attention.  Layouts change only
through views (rows regroup in row-major order: a view may split or merge constant factors but
never split the axis), ``cat`` along the dim (segments concatenate) and slices/splits (which must
cut at segment boundaries); every other op must produce dims whose expression already has a
layout (one layout per expression in a region, else it is ambiguous).  Integer arguments of
ops the tracer does not know are refused when they equal the original size of a symbolic dim,
and ops whose result depends on where a row sits (``flip``, ``roll``, ``cumsum``, ``triu``,
``gather``, convolutions, ...) are refused along a merged dim.
The rewrite is then *proved*: every node's symbolic shape evaluated at the original size equals
the shape Dynamo recorded, the re-specialised arguments evaluated there equal the original
arguments, and a concrete fake run of the rewritten region at the reduced size gives every node
the symbolic shape evaluated at that size.  Anything else — an unknown layout, a view that
splits the axis, a slice inside the axis, a side input that could line up in two ways — refuses
the region with a :class:`~omnicompile.passes.common.Reason` and it stays unwrapped.

Side inputs are tagged only when needed: the tracer first runs with the main input tagged
alone; where a broadcast then fails, the side inputs that feed the failing node are tried with
their candidate layouts (the main input's layout on a dim of the same size; ``[[c], [n]]`` or
``[[n], [c]]`` on a longer dim), the one that lets the trace get furthest is kept, and two
candidates that both succeed make the region ambiguous.  The first wrappable block of a list is
traced; the next ones, when they match it node for node (same ops and constants), reuse its
symbolic shapes and templates and are proved again on their own nodes.

Placement (S2T/T2S): the geometry comes from the patch embedding (``conv2d`` output
``[B*F, C, h, w]`` with a 5-D latent input ``[B, C, F, H, W]``: video; ``conv2d`` alone: image;
``conv3d`` ``[B, C, f, h, w]``: joint video; a 3-D latent input ``[B, N, C]`` and no conv:
packed tokens without a grid, split 1-D).  A region's role is read from where the traced axis
lands in its self-attention: the token and frame axes must be a spatial layer's sequence /
batch, the block axis a temporal layer's batch; otherwise the region is refused
(``merge_placement``).  The first and last ``merge_exclude`` blocks of every list are never
wrapped (the paper excludes them: most sensitive to caching).

Ablations (the paper's §4 / Figs. 9-10, for ``bench/``):

* ``placement="swapped"`` — S2S/T2T, read from the paper's own description: "swapping the
  positions of frame caching and block caching" (Fig. 9: r_t = 0, "Token Merge is not included
  since it can only be applied in the spatial layer").  Each cache keeps its rows, its features
  for the similarity and its split; only the layer type changes.  The *frame* cache wraps the
  temporal layers: frames are scored whole per sample (``[B, F, N*C]``, every other frame dst)
  and the same ``r_f`` frames leave every position's temporal sequence (``[B*N, F, C] ->
  [B*N, F - r_f, C]``: T2T, temporal attention sees a lower frame rate).  The *block* cache
  wraps the spatial layers: spatial positions (blocks, ``1 x 1 x F``) are scored whole per
  sample (``[B, N, F*C]``, one dst per 2x2 cell) and the same ``r_b`` positions leave every
  frame's token sequence (``[B*F, N, C] -> [B*F, N - r_b, C]``: S2S).  In both the merged
  axis is the layer's attention *sequence*, and one choice per sample is repeated over its
  ``G`` rows (``Wrap.groups``: ``G = N`` positions for frames, ``F`` frames for blocks), which
  needs the rows before the axis proved ``[B, G]`` batch-outer (traced glue, as for the
  paper's frame / block caches; else ``merge_batch_layout``).  The token cache has no swapped
  placement (a temporal layer does not hold a frame's tokens as rows): refused
  (``merge_placement``, subject ``token``); so are the frame / block caches of models without
  separate spatial and temporal layers (images, Wan's joint attention).
* ``fill="interpolate"`` — the paper's interpolation baselines (FI/BI/TI): no cache, a skipped
  row takes *this* step's output of the dst row it matches best (highest cosine similarity
  on the scored view, within its patch with ``patch``; first dst on ties) — ToMe's
  unmerge-by-copy, of the whole region output like ``fill="output"``.  Computed in the graph
  by :func:`interpolation_index` (torch ops; the kernels return no match) and applied with
  ``merge``.  No state is held; the first call of a generation still runs in full, so the
  schedule and FLOPs equal the cached fills' and only the fill differs.

Facts written: none on Dynamo's graph; :func:`plan_token_cache` returns a :class:`TokenPlan`
and :func:`apply_token_cache` rewrites any graph that still holds the planned regions (the
step policies' variants keep node names), appending the state inputs and outputs and, as
inputs after the state, the split index tensors (Inductor's AOT path takes only Dynamo's
parameters as module attributes).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from omnicompile.passes.common import Reason, example_value, is_param_placeholder, module_paths

__all__ = ["AXES", "PLACEMENTS", "FILLS", "Layout", "Wrap", "TokenPlan", "Geometry", "find_geometry",
           "trace_region", "plan_token_cache", "apply_token_cache", "state_specs", "interpolation_index"]

AXES = ("token", "frame", "block")
#: ``merge_placement``: "paper" (S2T/T2S) or "swapped" (the paper's S2S/T2T ablation)
PLACEMENTS = ("paper", "swapped")
#: ``merge_fill``: where a skipped row's value comes from
FILLS = ("auto", "output", "residual", "interpolate")
#: the layer type each cache wraps, per placement (None: no such placement)
LAYERS = {"paper": {"token": "spatial", "frame": "spatial", "block": "temporal"},
          "swapped": {"token": None, "frame": "temporal", "block": "spatial"}}


class _Refuse(Exception):
    def __init__(self, code: str, message: str, node: Optional[fx.Node] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.node = node


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class Layout:
    """Rows of one dim: segments (concatenated), each a row-major product of factors
    (``int`` or an axis name)."""

    segs: tuple

    @staticmethod
    def make(segs) -> "Layout | int":
        out = []
        for seg in segs:
            fac: list = []
            for f in seg:
                if isinstance(f, int):
                    if f == 1:
                        continue
                    if fac and isinstance(fac[-1], int):
                        fac[-1] *= f
                        continue
                fac.append(f)
            if not fac:
                fac = [1]
            if out and all(isinstance(f, int) for f in fac) and all(isinstance(f, int) for f in out[-1]):
                out[-1] = (math.prod(out[-1]) + math.prod(fac),)
                continue
            out.append(tuple(fac))
        if all(isinstance(f, int) for seg in out for f in seg):
            return sum(math.prod(seg) for seg in out)
        return Layout(tuple(out))

    def value(self, env: dict) -> Any:
        total = 0
        for seg in self.segs:
            p = 1
            for f in seg:
                p = p * (env[f] if isinstance(f, str) else f)
            total = total + p
        return total

    @property
    def composite(self) -> bool:
        return len(self.segs) > 1

    def seg_values(self, env: dict) -> list:
        return [Layout((seg,)).value(env) for seg in self.segs]

    def __str__(self) -> str:
        return " + ".join("*".join(str(f) for f in seg) for seg in self.segs)


@dataclasses.dataclass(frozen=True)
class _Size:
    """An integer argument that depends on the axis size (materialised per size)."""
    layout: Layout


def _materialize(obj, nodes: dict, env: dict):
    def f(a):
        if isinstance(a, fx.Node):
            return nodes[a]
        if isinstance(a, _Size):
            return a.layout.value(env)
        return a
    return _map(obj, f)


def _map(obj, f):
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map(o, f) for o in obj)
    if isinstance(obj, list):
        return [_map(o, f) for o in obj]
    if isinstance(obj, dict):
        return {k: _map(v, f) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_map(obj.start, f), _map(obj.stop, f), _map(obj.step, f))
    return f(obj)


def _ints(obj) -> list[int]:
    out: list[int] = []

    def f(a):
        if isinstance(a, int) and not isinstance(a, bool):
            out.append(a)
        return a
    _map(obj, f)
    return out


# ----------------------------------------------------------------------------- tracer


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    if isinstance(t, torch._ops.OpOverload):
        name = t._schema.name.split("::")[-1]
    return name


_VIEWS = {"view", "reshape", "_unsafe_view", "_reshape_alias"}
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


class _Tracer:
    """Interpret ``nodes`` (a region of ``gm``) with symbolic axis sizes (see module docstring)."""

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
            raise _Refuse("merge_layout_conflict",
                          f"rows of size {key} have two layouts ({old} and {lay}) in one region", node)
        self.reg[key] = lay

    def _lay(self, size) -> "Layout | int":
        """The layout of a dim of a fake tensor (an int where it does not depend on the axis)."""
        if isinstance(size, int):
            return size
        expr = sympy.expand(size.node.expr)
        if not expr.free_symbols:
            return int(expr)
        lay = self.reg.get(expr)
        if lay is None:
            raise _Refuse("merge_unknown_layout", f"a dim of size {expr} has no known row layout")
        return lay

    def _orig(self, lay) -> int:
        return lay if isinstance(lay, int) else int(lay.value(self.env_orig))

    def _layouts_of(self, t) -> list:
        return [self._lay(s) for s in t.shape]

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
                            raise _Refuse("merge_bad_input", f"input {n.name} dim {d} is {sizes[d]}, not {lay}", n)
                        self._register(lay, n)
                        sizes[d] = lay.value(self.symint)
                    return torch.empty(sizes, dtype=ev.dtype, device=ev.device)
                return torch.empty_strided(tuple(ev.shape), tuple(ev.stride()), dtype=ev.dtype, device=ev.device)
        if ev is None and n.op == "get_attr":
            return None
        if isinstance(ev, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            return ev
        raise _Refuse("merge_input", f"input {n.name} of the region is not a tensor or a constant", n)

    # -------------------------------------------------------------- run
    def run(self) -> None:
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a not in self.inside and a not in self.fv:
                    self.external.append(a)
                    self.fv[a] = self._input_fake(a)
            try:
                self._run_node(n)
            except _Refuse as e:
                if e.node is None:
                    e.node = n
                e.tracer = self
                raise
            except Exception as e:  # a failed broadcast, an op torch refuses at the symbolic size
                err = _Refuse("merge_trace_failed", f"{n.name} ({_target_name(n)}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", n)
                err.tracer = self
                raise err from None

    def _run_node(self, n: fx.Node) -> None:
        if n.op in ("placeholder", "output"):
            raise _Refuse("merge_region", f"region contains {n.op} {n.name}", n)
        if n.op == "call_module":
            raise _Refuse("merge_region", f"{n.name} calls a module", n)
        if n.op == "get_attr":
            raise _Refuse("merge_region", f"{n.name} reads a module attribute inside the region", n)
        self.pending = {}
        args, kwargs = self._rewrite(n)
        self.templates[n] = (args, kwargs)
        a, k = _materialize((args, kwargs), self.fv, self.symint)
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
                    raise _Refuse("merge_unknown_layout",
                                  f"{n.name} ({_target_name(n)}) makes rows of size {expr} with no known layout", n)

    # -------------------------------------------------------------- rules
    def _fake(self, a):
        return self.fv[a] if isinstance(a, fx.Node) else a

    def _rewrite(self, n: fx.Node) -> tuple:
        name = _target_name(n)
        args, kwargs = n.args, dict(n.kwargs)
        x = self._fake(args[0]) if args else None
        symbolic_in = any(isinstance(self.fv.get(a), torch.Tensor) and self._has_sym(self.fv[a])
                          for a in n.all_input_nodes)
        if not symbolic_in:
            if name in _FACTORIES or name not in _DIM_ONLY:
                bad = set(_ints((args, kwargs))) & self._collisions()
                if bad and name not in _VIEWS and name != "expand":
                    raise _Refuse("merge_ambiguous_int",
                                  f"{n.name} ({name}) takes the integer {sorted(bad)[0]}, the size of a merged axis", n)
            return args, kwargs
        if name in _VIEWS and isinstance(x, torch.Tensor):
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
            if dim is not None and self._is_sym(x.shape[dim]):
                raise _Refuse("merge_split_axis", f"{n.name} ({name}) cuts the merged rows", n)
            return args, kwargs
        if name in ("cat", "concat"):
            return self._cat(n)
        if name in _POSITIONAL:
            self._positional(n, name)
        if name in ("layer_norm", "rms_norm"):
            shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
            k = len(shape) if isinstance(shape, (tuple, list)) else 1
            if any(self._is_sym(s) for s in x.shape[x.dim() - k:]):
                raise _Refuse("merge_norm_axis", f"{n.name} normalises over the merged rows", n)
            return args, kwargs
        if name in _FACTORIES or name not in _DIM_ONLY:
            bad = set(_ints((args, kwargs))) & self._collisions()
            if bad:
                raise _Refuse("merge_ambiguous_int",
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
            if not isinstance(t, torch.Tensor) or not self._has_sym(t):
                continue
            if not isinstance(dims, (int, tuple, list)) or isinstance(dims, bool):
                raise _Refuse("merge_positional", f"{n.name} ({name}) depends on where rows sit", n)
            for d in (dims if isinstance(dims, (tuple, list)) else [dims]):
                if not isinstance(d, int) or self._is_sym(t.shape[d % t.dim()]):
                    raise _Refuse("merge_positional", f"{n.name} ({name}) depends on where the merged rows sit", n)

    def _has_sym(self, t) -> bool:
        return any(self._is_sym(s) for s in t.shape)

    @staticmethod
    def _is_sym(s) -> bool:
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
            raise _Refuse("merge_view", f"{n.name}: view of {in_orig} as {out_orig}", n)
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
                        raise _Refuse("merge_view", f"{n.name}: cannot regroup the rows", n)
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
                            raise _Refuse("merge_view", f"{n.name}: a view mixes merged rows with other rows", n)
                    elif head[0] == "s":
                        if need % head[2]:
                            raise _Refuse("merge_view", f"{n.name}: a view splits the merged axis", n)
                        fac.append(head[1])
                        need //= head[2]
                        seq.pop(0)
                    else:
                        if fac or need != head[2]:
                            raise _Refuse("merge_view", f"{n.name}: a view regroups text and image rows", n)
                        outs[j] = head[1]
                        seq.pop(0)
                        need = 1
                        fac = None
                        break
                if fac is not None:
                    outs[j] = Layout.make([fac])
            if any(h[0] != "c" or h[1] != 1 for h in seq):
                raise _Refuse("merge_view", f"{n.name}: cannot regroup the rows", n)
        for j, lay in enumerate(outs):
            if isinstance(lay, Layout):
                self.pending[(0, j)] = lay
        return outs

    def _view(self, n, x) -> tuple:
        out_orig = list(example_value(n).shape)
        outs = self._view_layouts(n, x, out_orig)
        sizes = tuple(_Size(l) if isinstance(l, Layout) else l for l in outs)
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
        sizes = tuple(_Size(l) if isinstance(l, Layout) else l for l in outs[dim:dim + k])
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
                    raise _Refuse("merge_expand", f"{n.name}: expands merged rows", n)
                out.append(_Size(lay) if v != -1 else -1)
            else:
                if isinstance(v, int) and lay == 1 and v in coll:
                    raise _Refuse("merge_ambiguous_int",
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
                raise _Refuse("merge_split_axis", f"{n.name}: cuts the merged rows at {b}", n)
            k = cum.index(b)
            pre = Layout.make(lay.segs[:k]) if k else 0
            out.append((_Size(pre) if isinstance(pre, Layout) else pre, k))
        return out

    def _piece(self, lay: Layout, k1: int, k2: int) -> "Layout | int":
        return Layout.make(lay.segs[k1:k2])

    def _index(self, n, x, idx) -> tuple:
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if sum(1 for it in items if it is Ellipsis) > 1:
            raise _Refuse("merge_index", f"{n.name}: two ellipses", n)
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
                raise _Refuse("merge_index", f"{n.name}: advanced indexing of merged rows", n)
            if isinstance(it, int):
                if isinstance(lay, Layout):
                    raise _Refuse("merge_index", f"{n.name}: picks one merged row", n)
                new_items.append(it)
                d += 1
                continue
            if not isinstance(it, slice):
                raise _Refuse("merge_index", f"{n.name}: index {it!r}", n)
            if isinstance(lay, Layout):
                total = self._orig(lay)
                if it.step not in (None, 1):
                    raise _Refuse("merge_index", f"{n.name}: strided slice of merged rows", n)
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
        lay = self._lay(x.shape[dim])
        if not isinstance(lay, Layout):
            return n.args, dict(n.kwargs)
        if isinstance(sizes, int):
            raise _Refuse("merge_split_axis", f"{n.name}: splits the merged rows in equal parts", n)
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        cuts = self._cut(n, lay, bounds)
        new_sizes = []
        for i in range(len(sizes)):
            piece = self._piece(lay, cuts[i][1], cuts[i + 1][1])
            if isinstance(piece, Layout):
                self.pending[(i, dim)] = piece
                new_sizes.append(_Size(piece))
            else:
                new_sizes.append(piece)
        return (args[0], new_sizes, dim), {}

    def _cat(self, n) -> tuple:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        fakes = [self._fake(t) for t in tensors]
        nd = fakes[0].dim()
        dim %= nd
        lays = [self._lay(t.shape[dim]) for t in fakes]
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
        """See :func:`_prove`."""
        for a in self.axes:
            if self.sym[a] in self.se.replacements:
                raise _Refuse("merge_specialized", f"the region specialises the {a} size")
        return _prove(self.nodes, self.fv, self.templates, self.tagged, self.external, self.sym,
                      self.env_orig, self.env_red)

    def out_layouts(self, n: fx.Node) -> list[dict[int, Layout]]:
        v = self.fv[n]
        flat = v if isinstance(v, (tuple, list)) else [v]
        res = []
        for t in flat:
            d: dict[int, Layout] = {}
            if isinstance(t, torch.Tensor):
                for i, s in enumerate(t.shape):
                    lay = self._lay(s)
                    if isinstance(lay, Layout):
                        d[i] = lay
            res.append(d)
        return res


def _prove(nodes, fv, templates, tagged, external, sym, env_orig, env_red) -> dict:
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

    normalised = _VIEWS | {"expand", "unflatten", "getitem", "setitem", "split", "split_with_sizes"}
    for n in nodes:
        want = example_value(n)
        if want is None:
            continue
        if shapes(fv[n], orig_sub) != real_shapes(want):
            raise _Refuse("merge_proof", f"{n.name}: symbolic shape at the original size "
                          f"{shapes(fv[n], orig_sub)} differs from the graph's {real_shapes(want)}", n)
        tmpl = _materialize(templates[n], {m: m for m in list(fv) + list(external)}, env_orig)
        if _target_name(n) not in normalised and _norm_args(tmpl) != _norm_args((n.args, dict(n.kwargs))):
            raise _Refuse("merge_proof", f"{n.name}: re-specialised arguments differ at the original size", n)
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
            a, k = _materialize(templates[n], vals, env_red)
            try:
                out = n.target(*a, **k) if n.op == "call_function" else getattr(a[0], n.target)(*a[1:], **k)
            except Exception as e:
                raise _Refuse("merge_proof", f"{n.name} fails at the reduced size: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}", n) from None
            vals[n] = out
            if shapes(fv[n], red_sub) != real_shapes(out):
                raise _Refuse("merge_proof", f"{n.name}: shape at the reduced size {real_shapes(out)} "
                              f"differs from the symbolic one {shapes(fv[n], red_sub)}", n)
    return {n: vals[n] for n in nodes}


class _Aligned:
    """A traced region transferred to a structurally identical block (same op sequence and
    constants, node for node): the symbolic shapes and templates are the traced block's, the
    proof is re-run on the new block's own nodes and shapes."""

    def __init__(self, tr: "_Tracer", amap: dict):
        self.tr = tr
        self.amap = amap
        self.nodes = [amap[n] for n in tr.nodes]
        self.back = {b: a for a, b in amap.items()}
        self.fv = {amap[a]: v for a, v in tr.fv.items() if a in amap}
        self.templates = {amap[a]: _map(t, lambda x: amap.get(x, x) if isinstance(x, fx.Node) else x)
                          for a, t in tr.templates.items()}
        self.tagged = {amap[a]: v for a, v in tr.tagged.items() if a in amap}
        self.external = [amap[a] for a in tr.external]

    def _is_sym(self, s) -> bool:
        return self.tr._is_sym(s)

    def _has_sym(self, t) -> bool:
        return self.tr._has_sym(t)

    def out_layouts(self, n):
        return self.tr.out_layouts(self.back[n])

    def prove(self) -> dict:
        return _prove(self.nodes, self.fv, self.templates, self.tagged, self.external, self.tr.sym,
                      self.tr.env_orig, self.tr.env_red)


def _align_blocks(a_nodes: Sequence[fx.Node], b_nodes: Sequence[fx.Node], region: Sequence[fx.Node]) -> Optional[dict]:
    """Node-for-node map of block ``a`` onto block ``b`` (same signatures with constants, same
    dataflow), extended to the externals ``region`` reads; None when they differ."""
    from omnicompile.passes.common import node_signature

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
    out = _map(obj, f)
    return repr(out)


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
            raise _Refuse("merge_view", f"cannot group {a} and {b}")
        gi, gj = [i], [j]
        pa, pb = a[i], b[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= len(a):
                    raise _Refuse("merge_view", f"cannot group {a} and {b}")
                gi.append(i)
                pa *= a[i]
                i += 1
            else:
                if j >= len(b):
                    raise _Refuse("merge_view", f"cannot group {a} and {b}")
                gj.append(j)
                pb *= b[j]
                j += 1
        out.append((gi, gj))
    return out


def trace_region(nodes: Sequence[fx.Node], axes: dict[str, tuple[int, int]],
                 tagged: dict[fx.Node, dict[int, Layout]]) -> _Tracer:
    """Trace ``nodes`` with the given inputs tagged; raises ``_Refuse``."""
    import logging
    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)   # failed broadcasts are expected while searching
    try:
        t = _Tracer(nodes, axes, tagged)
        t.run()
        return t
    finally:
        quiet.setLevel(level)


# ----------------------------------------------------------------------------- geometry


@dataclasses.dataclass
class Geometry:
    """Where the latent's rows come from (read from the patch embedding)."""

    kind: str                  # "image" | "video" | "joint" | "packed"
    batch: int
    frames: Optional[int]
    h: Optional[int]
    w: Optional[int]

    @property
    def tokens(self) -> int:
        """Rows of the token axis: tokens of a frame (image, video), of the clip (joint)."""
        if self.kind == "joint":
            return self.frames * self.h * self.w
        return self.h * self.w

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _name(n: fx.Node) -> str:
    return _target_name(n) if n.op in ("call_function", "call_method") else ""


def _user_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and not is_param_placeholder(n)]


def find_geometry(gm: fx.GraphModule) -> tuple[Optional[Geometry], Optional[Reason]]:
    """The latent's geometry from the patch embedding before the first block (see module doc)."""
    first = next((n for n in gm.graph.nodes if "omni.block" in n.meta), None)
    if first is None:
        return None, Reason("merge_no_blocks", "no block to wrap")
    conv = None
    for n in gm.graph.nodes:
        if n is first:
            break
        if _name(n) in ("conv2d", "conv3d") and isinstance(example_value(n), torch.Tensor):
            conv = n
    users = [(n, example_value(n)) for n in _user_inputs(gm)]
    users = [(n, v) for n, v in users if isinstance(v, torch.Tensor)]
    if conv is not None:
        s = tuple(example_value(conv).shape)
        if _name(conv) == "conv3d" and len(s) == 5:
            return Geometry("joint", s[0], s[2], s[3], s[4]), None
        if len(s) == 4:
            for n, v in users:
                if v.dim() == 5 and v.shape[0] * v.shape[2] == s[0] and v.shape[2] > 1:
                    return Geometry("video", int(v.shape[0]), int(v.shape[2]), s[2], s[3]), None
            return Geometry("image", s[0], None, s[2], s[3]), None
    lat = [(n, v) for n, v in users if v.dim() == 3 and "hidden_states" in n.name and "encoder" not in n.name]
    if len(lat) == 1:
        v = lat[0][1]
        return _packed(int(v.shape[0]), int(v.shape[1])), None
    return None, Reason("merge_no_geometry", "no patch embedding (conv2d/conv3d) or packed latent input "
                        "[B, N, C] found: cannot tell which rows are tokens")


def _packed(batch: int, n: int) -> Geometry:
    g = Geometry("packed", batch, None, None, None)
    g.packed_tokens = n  # type: ignore[attr-defined]
    return g


def _geo_tokens(geo: Geometry) -> int:
    return getattr(geo, "packed_tokens", None) or geo.tokens


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass
class TaggedInput:
    name: str
    site: tuple                # (region node name, index in its all_input_nodes)
    dim: int
    layout: Layout
    shape: tuple
    pre: int                   # rows are viewed [pre, N, post] (single segment) ...
    post: int
    segs: Optional[tuple] = None   # ... or [before, c0 + N + c1, after] (text rows kept whole)


@dataclasses.dataclass
class TaggedOutput:
    name: str
    dim: int
    layout: Layout
    shape: tuple
    dtype: torch.dtype
    pre: int
    post: int


@dataclasses.dataclass
class Wrap:
    """One wrapped region (see the module docstring)."""

    block: str
    axis: str
    region: list[str]
    rows: int                  # N
    kept: int                  # N - r
    sel: int                   # P: independent selections (e.g. one per frame)
    main: str
    inputs: list[TaggedInput]
    outputs: list[TaggedOutput]
    split: tuple               # (src, dst, src_group, dst_group) as lists (None where absent)
    splits: list               # one split per rotation phase (merge_rotate), splits[0] == split
    split_text: str
    templates: dict            # region node name -> (args, kwargs) with _Ref / _Size
    reduced: dict              # region node name -> fake value at the reduced size
    sites: dict                # external name -> (region node name, input index)
    device: Any = None
    fill: str = "output"       # "output": skipped rows keep last step's output; "residual":
    #                            skipped rows get this step's input + last step's (output - input);
    #                            "interpolate": skipped rows copy this step's output of their
    #                            matched (most similar) dst row (no state)
    groups: int = 1            # G: consecutive selections sharing one choice of rows (swapped
    #                            placement: the frames, or positions, of a sample; scored together)
    placement: str = "paper"
    flops_full: int = 0
    flops_merged: int = 0

    @property
    def r(self) -> int:
        return self.rows - self.kept

    def describe(self) -> dict:
        return {"block": self.block, "axis": self.axis, "fill": self.fill, "placement": self.placement,
                "rows": self.rows, "skipped": self.r, "selections": self.sel // self.groups,
                "split": self.split_text, "phases": len(self.splits), "region_nodes": len(self.region),
                "inputs": [f"{t.name}[{t.dim}]={t.layout}" for t in self.inputs],
                "outputs": [f"{o.name}[{o.dim}]" for o in self.outputs],
                "flops_full": self.flops_full, "flops_merged": self.flops_merged}


@dataclasses.dataclass
class TokenPlan:
    wraps: list[Wrap]
    refused: list[Reason]
    geometry: Optional[Geometry]
    #: ``merge_refresh``: every N-th call of a slot in a generation runs the full graph (the
    #: runtime's choice, carried here; None = only the first call)
    refresh: Optional[int] = None

    def describe(self) -> dict:
        return {"geometry": self.geometry.describe() if self.geometry else None,
                "wrapped": [w.describe() for w in self.wraps], "refresh": self.refresh}


@dataclasses.dataclass(frozen=True)
class _Ref:
    name: str


def _to_refs(obj):
    return _map(obj, lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)


_FFN = {"ff", "ffn", "ff_context", "mlp", "proj_mlp", "feed_forward", "feedforward", "ff_out"}


def _is_ffn(n: fx.Node, block: str) -> bool:
    for p in module_paths(n):
        if p.startswith(block + "."):
            if p[len(block) + 1:].split(".")[0] in _FFN:
                return True
    return False


def _externals(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    inside = set(nodes)
    seen: dict = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                seen.setdefault(a, None)
    return list(seen)


def _outputs(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    inside = set(nodes)
    return [n for n in nodes if any(u not in inside for u in n.users)]


def _pre_post(shape, dim: int, lay: Layout, axis: str) -> Optional[tuple[int, int]]:
    if lay.composite:
        return None
    seg = lay.segs[0]
    k = seg.index(axis)
    outer = math.prod(f for f in seg[:k])
    inner = math.prod(f for f in seg[k + 1:])
    return math.prod(shape[:dim]) * outer, inner * math.prod(shape[dim + 1:])


def _sdpa_role(tr: _Tracer) -> Optional[str]:
    """Where the axis lands in the region's attention: "seq" (some attention runs along it),
    "batch" (every attention runs per row) or None (no attention op)."""
    seen = False
    seq = False
    for n in tr.nodes:
        if _name(n) != "scaled_dot_product_attention":
            continue
        seen = True
        q = n.kwargs.get("query", n.args[0] if n.args else None)
        qf = tr.fv.get(q)
        if not isinstance(qf, torch.Tensor):
            return None
        if tr._is_sym(qf.shape[-2]) or tr._is_sym(qf.shape[-1]):
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
            n_rows: int, start: Optional[dict] = None) -> tuple[Optional[_Tracer], Optional[dict], Optional[_Refuse]]:
    """Trace with the main input tagged, adding side inputs where a broadcast needs them: at
    each failure, the untagged side inputs that feed the failing node are tried (one, then
    pairs: a cross-attention needs its key and value together); the choice that gets the trace
    furthest is kept; two choices that both complete the trace make the region ambiguous."""
    import itertools

    ext = _externals(nodes)
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
            except _Refuse as e:
                fail = e
        if fail.node is None or fail.node not in order:
            return None, None, fail
        # culprits: side inputs behind the failing node's operands that carry no merged rows
        trf = getattr(fail, "tracer", None)
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
                except _Refuse as e2:
                    prog = order.get(e2.node, -1)
                    if prog <= order[fail.node]:
                        continue
                    fails[combo] = e2
                if prog > best_prog:
                    best, best_prog = [combo], prog
                elif prog == best_prog:
                    best.append(combo)
            if len(done) > 1:
                return None, None, _Refuse(
                    "merge_ambiguous_side", "side inputs can line up with the merged rows in more than one way: "
                    + "; ".join(", ".join(f"{t.name}[{d}]={lay}" for t, d, lay in c) for c, _ in done), fail.node)
            if len(best) > 1:
                return None, None, _Refuse("merge_ambiguous_side", "more than one way to line up side inputs with "
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
    return None, None, _Refuse("merge_trace_failed", "no consistent tagging of the side inputs")


def _carries(tr: "_Tracer", v) -> bool:
    flat = v if isinstance(v, (tuple, list)) else [v]
    return any(isinstance(t, torch.Tensor) and tr._has_sym(t) for t in flat)


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
        lay = tr._lay(tr.fv[main].shape[dim])
    except _Refuse as e:
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


#: ``merge_rotate``: the dst position cycled through, per step, in each ``2x2`` cell (row-major
#: offsets: diagonal first, so two consecutive steps differ in both coordinates), along every
#: other frame, and in each run of 4 rows of a packed (1-D) axis
ROTATION = {"cell": (0, 3, 1, 2), "frame": (0, 1), "packed": (0, 2, 1, 3)}


def _split_for(axis: str, geo: Geometry, n_rows: int, patch: Optional[int], rotate: bool = False) -> tuple:
    """(splits, text): the src/dst splits of the axis, one per rotation phase (one without
    ``rotate``), each ``(src, dst, src_group, dst_group)`` as lists.  Phases whose lists are not
    as long as phase 0's (a dst offset past the last row of an odd count) are left out, so every
    phase fits the same compiled graph."""
    from omnicompile import kernels as K

    if axis == "frame":
        make, kind = (lambda o: K.frame_split(n_rows, stride=2, offset=o, device="cpu")), "frame"
        text = "every other frame is dst" + (" (patch ignored: frames are matched whole)" if patch else "")
    elif geo.kind == "packed":
        make, kind = (lambda o: K.frame_split(n_rows, stride=4, offset=o, device="cpu")), "packed"
        text = "1-D: one dst per 4 rows (no patch grid in the graph)" + (" (patch ignored)" if patch else "")
    else:
        h, w = (geo.frames * geo.h, geo.w) if (axis == "token" and geo.kind == "joint") else (geo.h, geo.w)
        make, kind = (lambda o: K.token_split(h, w, cell=2, offset=o, patch=patch, device="cpu")), "cell"
        text = f"one dst per 2x2 cell of the {h}x{w} grid" + (f", matched within {patch}x{patch} patches" if patch else "")
    offsets = ROTATION[kind] if rotate else (0,)
    splits = []
    for o in offsets:
        try:
            sp = make(o)
        except ValueError:
            if o == 0:
                raise
            continue        # e.g. fewer rows than the stride: no such dst offset
        sp = tuple(None if t is None else t.tolist() for t in sp)
        if splits and any((a is None) != (b is None) or (a is not None and len(a) != len(b))
                          for a, b in zip(sp, splits[0])):
            continue
        splits.append(sp)
    if len(splits) > 1:
        text += f", dst rotated over {len(splits)} offsets"
    return splits, text


def plan_token_cache(gm: fx.GraphModule, blocks, *, token_ratio: float = 0.0, frame_ratio: float = 0.0,
                     block_ratio: float = 0.0, patch: Optional[int] = None, merge_ffn: bool = False,
                     exclude: int = 1, fill: str = "output", placement: str = "paper",
                     rotate: bool = False) -> TokenPlan:
    """Decide and prove which regions the token / frame / block caches wrap (module docstring).

    ``blocks`` is :func:`~omnicompile.passes.blocks.find_blocks`' analysis.  Pure: reads
    ``gm``, writes nothing on it.  One region per block: where two axes fit a block, the first
    of frame, block, token wins.  ``placement`` and ``fill``: see "Ablations" in the module
    docstring; ``rotate`` (``merge_rotate``; off here, on in the config): one split per
    rotation phase, see "Staleness" there.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    ratios = {"frame": frame_ratio, "block": block_ratio, "token": token_ratio}
    active = [a for a in ("frame", "block", "token") if ratios[a] > 0]
    refused: list[Reason] = []
    wraps: list[Wrap] = []
    if placement == "swapped" and "token" in active:
        active.remove("token")
        refused.append(Reason("merge_placement", "token cache: merge_placement='swapped' is the paper's S2S/T2T "
                              "ablation (Fig. 9), which swaps the frame and block caches; the token cache has no "
                              "swapped placement (its rows are the tokens of a frame, which a temporal layer does "
                              "not hold as rows: the paper leaves it out, r_t = 0)", "token"))
    if not active:
        return TokenPlan([], refused, None)
    symbolic = [n.name for n in gm.graph.nodes if n.op == "placeholder"
                and isinstance(example_value(n), torch.Tensor)
                and any(not isinstance(d, int) for d in example_value(n).shape)]
    if symbolic:   # the re-specialisation proves concrete row counts; a dynamic graph has none
        return TokenPlan([], refused + [Reason("merge_dynamic_shape", "inputs with symbolic sizes ("
                                               + ", ".join(symbolic[:3]) + "): compile with dynamic=False",
                                               "graph")], None)
    geo, why = find_geometry(gm)
    if geo is None:
        return TokenPlan([], refused + [why], None)
    for axis in active:
        if axis in ("frame", "block") and geo.kind != "video":
            what = ("frames are part of the token rows of a joint spatio-temporal attention (use token_ratio)"
                    if geo.kind == "joint" else "not a video model")
            refused.append(Reason("merge_placement", f"{axis} cache: {what}; the {axis} cache wraps "
                                  f"{LAYERS[placement][axis]} layers of a video model"
                                  + (" (merge_placement='swapped')" if placement == "swapped" else ""), axis))
    taken: dict[str, str] = {}
    opts = dict(geo=geo, patch=patch, merge_ffn=merge_ffn, fill=fill, placement=placement, rotate=rotate)
    for bl in blocks.lists:
        n_blocks = len(bl.blocks)
        excl = [b.name for i, b in enumerate(bl.blocks) if i < exclude or i >= n_blocks - exclude]
        if excl:
            refused.append(Reason("merge_excluded", f"first/last {exclude} block(s) never merged: {', '.join(excl)}",
                                  bl.name))
        for axis in active:
            if axis in ("frame", "block") and geo.kind != "video":
                continue
            proto = None
            for b in bl.blocks:
                if b.name in excl:
                    continue
                if fill == "auto":   # residual where the block's output is a residual stream, else output
                    w, r, proto_r = _plan_block(gm, b, axis, ratios[axis], proto, **dict(opts, fill="residual"))
                    if w is None and r.code == "merge_fill":
                        w, r, proto_r = _plan_block(gm, b, axis, ratios[axis], proto, **dict(opts, fill="output"))
                    proto = proto_r
                else:
                    w, r, proto = _plan_block(gm, b, axis, ratios[axis], proto, **opts)
                if w is None:
                    refused.append(r)
                    if r.code == "merge_placement":   # the same for every block of the list
                        break
                elif b.name in taken:
                    refused.append(Reason("merge_combined", f"already merged along {taken[b.name]}; one merged "
                                          "axis per block (hierarchical token-in-frame merging is not implemented)",
                                          f"{b.name}:{axis}"))
                else:
                    wraps.append(w)
                    taken[b.name] = axis
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    wraps.sort(key=lambda w: order[w.region[0]])
    if wraps:
        _measure(gm, wraps)
    return TokenPlan(wraps, refused, geo)


@dataclasses.dataclass
class _Proto:
    """What the first traced block of a list hands to the next ones."""
    block: Any
    tr: Any
    main: fx.Node
    dim: int
    lay: Layout
    region: list
    tagged: dict


def _plan_block(gm, b, axis: str, ratio: float, proto: Optional[_Proto], *, geo: Geometry, patch, merge_ffn: bool,
                fill: str = "output", placement: str = "paper", rotate: bool = False):
    """Wrap block ``b`` along ``axis``: (wrap, None, proto) or (None, reason, proto)."""
    subject = f"{b.name}:{axis}"

    def no(code, msg):
        return None, Reason(code, msg, subject), proto

    groups = 1
    if axis == "token":
        n_rows, per = _geo_tokens(geo), 1
    elif placement == "swapped":   # the axis is the layer's sequence; one choice per sample
        n_rows, per = (geo.frames, 1) if axis == "frame" else (geo.h * geo.w, 1)
        groups = geo.h * geo.w if axis == "frame" else geo.frames
    elif axis == "frame":
        n_rows, per = geo.frames, geo.batch
    else:
        n_rows, per = geo.h * geo.w, geo.batch
    try:
        sp, text = _split_for(axis, geo, n_rows, patch, rotate)
    except ValueError as e:
        return no("merge_patch", str(e))
    r = min(int(ratio * n_rows), len(sp[0][0]))
    if r < 1:
        return no("merge_ratio", f"ratio {ratio} of {n_rows} rows skips none")
    kept = n_rows - r
    if kept < 2:
        return no("merge_ratio", f"ratio {ratio} leaves {kept} of {n_rows} rows (at least 2 must be kept)")
    axes = {axis: (n_rows, kept)}
    nodes = list(b.nodes)
    amap = _align_blocks(proto.block.nodes, nodes, proto.region) if proto is not None else None
    if amap is not None and proto.tr is None:   # the same block structure failed the same way
        return None, Reason(proto.tagged.code, proto.tagged.message, subject), proto
    if amap is not None:
        tr = _Aligned(proto.tr, amap)
        main, d, lay, region = amap[proto.main], proto.dim, proto.lay, [amap[n] for n in proto.region]
        new_proto = proto
    else:
        got = _analyze(gm, b, axis, axes, n_rows, per, merge_ffn, placement, groups, geo)
        if isinstance(got, Reason):
            return None, got, _Proto(b, None, None, 0, None, list(b.nodes), got)
        main, d, lay, tr, tagged, region = got
        new_proto = _Proto(b, tr, main, d, lay, region, tagged)
    try:
        reduced = tr.prove()
    except _Refuse as e:
        return None, Reason(e.code, e.message, subject), new_proto
    w, why = _make_wrap(gm, b, axis, tr, main, d, lay, region, reduced, n_rows, kept, sp, text, fill, groups,
                        placement)
    if w is None:
        return None, Reason(why[0], why[1], subject), new_proto
    return w, None, new_proto


def _analyze(gm, b, axis, axes, n_rows: int, per: int, merge_ffn: bool, placement: str = "paper",
             groups: int = 1, geo: Optional[Geometry] = None):
    """Find the block's main input and axis dim, tag side inputs, check the placement and cut
    the feed-forward: (main, dim, layout, tracer, tagged, region) or a Reason.  ``groups > 1``
    (swapped placement): the rows before the axis dim must be proved ``[batch, groups]``, batch
    outer, so that one choice of rows per sample can be repeated over its ``groups`` rows."""
    subject = f"{b.name}:{axis}"
    nodes = list(b.nodes)
    outs = _outputs(nodes)
    ext = [t for t in _externals(nodes) if not is_param_placeholder(t)]
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
                if any(_name(n) == "scaled_dot_product_attention" for n in region0[k:]):
                    return Reason("merge_ffn", "the feed-forward runs before or beside the attention "
                                  "(merge_ffn=False cannot exclude it; merge_ffn=True merges the whole block)", subject)
                region0, cut = region0[:k], True
        if per == 1:
            lay = Layout(((axis,),))
        else:
            lay = _glue_layout(gm, main, d, axis, n_rows, kept)
            if isinstance(lay, Reason):
                last_err = _Refuse(lay.code, lay.message)
                continue
        # the layer's role from a trace up to the first attention; the rest only where it fits
        first_attn = next((i for i, n in enumerate(region0) if _name(n) == "scaled_dot_product_attention"), None)
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
                last_err = _Refuse(why.code, why.message)
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
            ext_r = set(_externals(region))
            try:
                tr = trace_region(region, axes, {t: v for t, v in tagged.items() if t in ext_r})
            except _Refuse as e:
                return Reason(e.code, e.message, subject)
    return main, d, lay, tr, tagged, region


def _make_wrap(gm, b, axis, tr, main, d, lay, region, reduced, n_rows, kept, sp, text, fill, groups=1,
               placement="paper"):
    """The Wrap record of a proved region, or (None, (code, message))."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    anchor = max([order[region[0]] - 1] + [order[t] for t in _externals(region)])
    rset = set(region)
    if any(order[u] <= anchor for o in _outputs(region) for u in o.users if u not in rset):
        return None, ("merge_region", "a value the block reads is computed after a use of its output")
    sel = _pre_post(example_value(main).shape, d, lay, axis)[0]
    if sel % groups:
        return None, ("merge_batch_layout", f"{sel} row groups are not {groups} per sample")
    ext_r = _externals(region)
    sites = {}
    for t in ext_r:
        for rn in region:
            if t in rn.all_input_nodes:
                sites[t.name] = (rn.name, rn.all_input_nodes.index(t))
                break
    inputs = []
    for t, tags in tr.tagged.items():
        if t not in set(ext_r):
            continue
        (td, tl), = tags.items()
        shape = tuple(example_value(t).shape)
        p = _pre_post(shape, td, tl, axis)
        segs = None
        if p is None:
            vals = [int(v) for v in tl.seg_values({axis: n_rows})]
            ax = [k for k, s in enumerate(tl.segs) if axis in s]
            if sel != 1 or len(ax) != 1 or tl.segs[ax[0]] != (axis,):
                return None, ("merge_input_layout", f"{t.name}: rows {tl} with {sel} selections")
            k = ax[0]
            segs = (math.prod(shape[:td]), sum(vals[:k]), sum(vals[k + 1:]), math.prod(shape[td + 1:]))
            p = (0, 0)
        elif p[0] != sel and sel != 1:
            return None, ("merge_input_layout", f"{t.name}: {p[0]} row groups for {sel} selections")
        inputs.append(TaggedInput(t.name, sites[t.name], td, tl, shape, p[0], p[1], segs))
    mev = example_value(main)
    outputs = []
    for o in _outputs(region):
        lays = tr.out_layouts(o)
        ev = example_value(o)
        if not any(lays):
            continue
        if not isinstance(ev, torch.Tensor) or len(lays[0]) != 1:
            return None, ("merge_output", f"{o.name}: an output with merged rows that is not one tensor with one "
                          "merged dim")
        (od, ol), = lays[0].items()
        p = _pre_post(tuple(ev.shape), od, ol, axis)
        if p is None or p[0] != sel:
            return None, ("merge_output", f"{o.name}: output rows {ol} do not line up with the {sel} selections")
        if fill == "residual" and (tuple(ev.shape) != tuple(mev.shape) or ev.dtype != mev.dtype
                                   or od != d or ol != lay):
            return None, ("merge_fill", f"{o.name} is not a residual stream of {main.name} "
                          "(fill='residual' needs output - input per row)")
        outputs.append(TaggedOutput(o.name, od, ol, tuple(ev.shape), ev.dtype, p[0], p[1]))
    if not outputs:
        return None, ("merge_output", "no output of the block carries the merged rows")
    w = Wrap(block=b.name, axis=axis, region=[n.name for n in region], rows=n_rows, kept=kept, sel=sel,
             main=main.name, inputs=inputs, outputs=outputs, split=sp[0], splits=sp, split_text=text,
             templates={n.name: _to_refs(tr.templates[n]) for n in region},
             reduced={n.name: reduced[n] for n in region}, sites=sites, device=mev.device, fill=fill,
             groups=groups, placement=placement)
    return w, None


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


def _attention_prefix(block: str, nodes: list[fx.Node], tr: _Tracer, ends_before_ffn: bool = False):
    """The block up to its feed-forward sub-layer: the longest prefix that holds every
    attention op, stops before the first feed-forward node and hands exactly one value with
    merged rows (the residual stream) to the rest.  ``ends_before_ffn``: ``nodes`` is already
    cut right before the first feed-forward node."""
    k = len(nodes) if ends_before_ffn else next((i for i, n in enumerate(nodes) if _is_ffn(n, block)), None)
    if k is None:
        return nodes, None
    last_attn = max((i for i, n in enumerate(nodes) if _name(n) == "scaled_dot_product_attention"), default=-1)
    if last_attn < 0 or last_attn >= k:
        return None, "the feed-forward runs before or beside the attention (merge_ffn=False cannot exclude it)"

    def merged(n):
        v = tr.fv.get(n)
        flat = v if isinstance(v, (tuple, list)) else [v]
        return any(isinstance(t, torch.Tensor) and tr._has_sym(t) for t in flat)

    for c in range(k, last_attn, -1):
        pre = nodes[:c]
        crossing = [n for n in _outputs(pre) if merged(n)]
        if len(crossing) == 1 and isinstance(tr.fv.get(crossing[0]), torch.Tensor):
            return pre, None
    return None, "no point before the feed-forward where a single merged value leaves the attention"


def _measure(gm: fx.GraphModule, wraps: list[Wrap]) -> None:
    """FLOPs of each region, computed and merged (the cost model on both graphs)."""
    from omnicompile.graphs.cost import node_flops

    by = {n.name: n for n in gm.graph.nodes}
    for w in wraps:
        w.flops_full = sum(node_flops(by[r]) for r in w.region)
    merged, _, _ = apply_token_cache(gm, TokenPlan(wraps, [], None), merged=True)
    per: dict[str, int] = {}
    for n in merged.graph.nodes:
        blk = n.meta.get("omni.merged")
        if blk is not None:
            per[blk] = per.get(blk, 0) + node_flops(n)
    for w in wraps:
        w.flops_merged = per.get(w.block, 0)


# ----------------------------------------------------------------------------- rewrite

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


def present_wraps(g: fx.GraphModule, plan: TokenPlan) -> list[Wrap]:
    """The planned regions whose nodes are all in ``g`` (a step variant drops reused ones)."""
    names = {n.name for n in g.graph.nodes}
    return [w for w in plan.wraps if all(r in names for r in w.region)]


def apply_token_cache(g: fx.GraphModule, plan: TokenPlan, merged: bool,
                      phases: Optional[list] = None) -> tuple[fx.GraphModule, list[Wrap], list]:
    """Rewrite a copy of ``g``: every planned region present in ``g`` (by node name) runs on the
    kept rows (``merged=True``) or in full.  Signature: ``(*g_inputs, *state[present], *consts)
    -> (*g_outputs, *state'[present])`` (``state`` and ``consts`` only when merged), states
    ordered by :func:`state_specs`; ``consts`` are the split index tensors (graph inputs, not
    attributes: Inductor's AOT path takes only Dynamo's parameters as attributes).
    Returns the new graph, the wraps it holds and the constants of rotation phase 0.  With
    ``merge_rotate`` a wrap has several splits (``Wrap.splits``) of one shape: pass a list as
    ``phases`` and it receives one constants list per phase ``p`` of the graph (``p`` in
    ``[0, lcm of the wraps' phase counts)``; wrap ``w`` uses its split ``p % len(w.splits)``):
    the same graph runs every phase, the host picks the list."""
    from omnicompile.passes.common import copy_graph_module
    from omnicompile.passes.rewrite import _add_placeholder, _output_values, _safe, _set_outputs

    import omnicompile.kernels  # noqa: F401  (registers torch.ops.omnicompile.*)

    new, _ = copy_graph_module(g)
    graph = new.graph
    present = present_wraps(new, plan)
    out_node, outs = _output_values(graph)
    states: list[list[fx.Node]] = []
    for w in present:
        st = []
        for o in (w.outputs if w.fill != "interpolate" else []):
            if merged:
                st.append(_add_placeholder(graph, f"omni_tok_{_safe(w.block)}_{o.name}",
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
    _set_outputs(out_node, outs + extra)
    graph.lint()
    new.recompile()
    n_phases = math.lcm(*[len(w.splits) for w in present]) if (merged and present) else 1
    per_phase = [[ts[p % len(ts)] for ts in consts] for p in range(n_phases)]
    if phases is not None:
        phases[:] = per_phase
    return new, present, per_phase[0]


def _rewrite_wrap(gm: fx.GraphModule, by_name: dict, k: int, w: Wrap, caches: list[fx.Node],
                  consts: list) -> list[fx.Node]:
    from omnicompile.passes.rewrite import _add_placeholder

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
        return _add_placeholder(graph, f"{tag}_{name}", _fake(ts[0].shape, ts[0].dtype, dev))

    def call(fn, args, shape=None, dtype=None, method=False):
        n = graph.call_method(fn, args) if method else graph.call_function(fn, args)
        n.meta["omni.merged"] = w.block
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
        if isinstance(a, _Ref):
            return mapping[a.name]
        if isinstance(a, _Size):
            return int(a.layout.value(env))
        return a
    return _map(obj, f)
