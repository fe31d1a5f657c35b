"""Cost model: FLOPs and bytes moved of FX nodes and regions, concrete or symbolic (sympy).

**What is counted.**  FLOPs of the matmul-like work, the same ops and formulas as
``torch.utils.flop_counter.FlopCounterMode``: linear / matmul / mm / bmm / addmm / baddbmm
(2·M·N·K), scaled_dot_product_attention (4·B·H·L·S·D: QKᵀ and PV; FlopCounterMode counts it
on CPU when the math backend runs it), convolutions (2·out·Cin/groups·kernel), einsum with a
contracted index (2·∏ all index sizes).  Elementwise ops count no FLOPs — they are a few
percent of a transformer block and memory-bound anyway; the *bytes* model covers them: every
node that is not a pure view moves the bytes of its tensor inputs and outputs (no fusion
assumed: an upper bound of the traffic Inductor leaves).

**Concrete.**  :func:`node_flops` / :func:`node_bytes` read the shapes Dynamo recorded in
``node.meta["example_value"]`` (symbolic sizes use their hints).  ``node_flops`` is the
estimate behind "FLOPs saved" in reports; it agrees with FlopCounterMode on the diffusers
test models (tests/test_cost.py).

**Symbolic.**  :func:`node_cost` / :func:`region_cost` return a :class:`Cost` of sympy
expressions in the graph's *data sizes* — ``batch``, ``tokens``, ``text_tokens``,
``frames``, ``height``, ``width`` — built by :func:`size_symbols` from the user inputs'
shapes.  Dynamo hands us graphs with static shapes (sizes are baked into view arguments, so
symbolic re-propagation specialises them away); symbols are therefore *recovered*: each
factor of a formula has a role — a model dimension (weights, heads, head size: kept as a
number), a data dimension (rows, sequence length, spatial size: matched against
expressions in the size symbols, e.g. ``batch*(tokens + text_tokens)`` or
``frames*height*width/4``), or either (a matmul's N and K: a number when a parameter has
that size, else matched as data).  Invariants:

* evaluated at the traced sizes, a symbolic cost equals the concrete one exactly
  (every symbol's value is the dimension it replaced);
* at other sizes it is exact when the traced sizes were unambiguous (no data size equal to
  a model width, batch > 1); otherwise the ambiguous factor keeps its traced value.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import sympy
import torch

__all__ = ["node_flops", "node_bytes", "Cost", "ZERO", "SizeSymbols", "size_symbols", "node_cost",
           "region_cost", "graph_flops", "graph_size_symbols", "SIZE_NAMES"]

#: the names of the size symbols, in the order they are looked for
SIZE_NAMES = ("batch", "tokens", "text_tokens", "frames", "height", "width")

# ops that move no data (views and metadata); ``contiguous`` may copy but usually does not
_VIEW_OPS = {
    "view", "reshape", "permute", "transpose", "unsqueeze", "squeeze", "flatten", "unflatten", "expand",
    "chunk", "split", "split_with_sizes", "unbind", "getitem", "narrow", "select", "t", "contiguous",
    "size", "dim", "to", "float", "type_as", "detach", "view_as", "expand_as", "movedim", "as_strided",
    "_assert_tensor_metadata", "dropout",
}


def _val(x):
    if hasattr(x, "meta"):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def _shape(x) -> Optional[list[int]]:
    """Concrete sizes; a symbolic size gives its hint (the size it was traced at).  Never
    ``int()`` a symbolic size: that would add a guard to Dynamo's shape environment and
    specialise the compiled graph to the traced size."""
    v = _val(x)
    if isinstance(v, torch.Tensor):
        out = []
        for d in v.shape:
            if isinstance(d, int):
                out.append(d)
                continue
            hint = getattr(getattr(d, "node", None), "hint", None)
            if hint is None:
                return None
            out.append(int(hint))
        return out
    return None


def _name(node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if t is operator.matmul:
        return "matmul"
    if t is operator.getitem:
        return "getitem"
    return name.split(".")[0]


def _arg(node, i: int, key: str):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key)


# ----------------------------------------------------------------------------- formulas
# Each formula lists its factors as (role, value): "m" model dimension, "d" data dimension,
# "l" leading (batch-like) data dimension, "e" either; "r" rows: a product of leading and
# sequence dimensions matched as a whole.  The caller maps every factor to an int or a
# sympy expression and multiplies.


def _flop_factors(node) -> Optional[list[tuple[str, int]]]:
    if node.op not in ("call_function", "call_method"):
        return None
    name = _name(node)
    args = node.args
    try:
        if name == "linear":
            x, w = _shape(_arg(node, 0, "input")), _shape(_arg(node, 1, "weight"))
            if x is None or w is None:
                return None
            return [("c", 2), ("r", math.prod(x[:-1])), ("m", w[0]), ("m", w[1] if len(w) > 1 else 1)]
        if name in ("matmul", "bmm", "mm", "__matmul__", "baddbmm", "addmm"):
            a_i, b_i = (1, 2) if name in ("baddbmm", "addmm") else (0, 1)
            a, b, out = _shape(args[a_i]), _shape(args[b_i]), _shape(node)
            if a is None or b is None or out is None or not out:
                return None
            k = a[-1]
            if len(out) == 1:            # matrix @ vector
                return [("c", 2), ("r", out[0]), ("e", k)]
            lead = out[:-2]
            f = [("c", 2)]
            if lead:
                f.append(("l", lead[0]))
                f += [("m", d) for d in lead[1:]]
                f.append(("d", out[-2]))
            else:                        # 2-D: rows may be batch*tokens flattened
                f.append(("r", out[-2]))
            return f + [("e", out[-1]), ("e", k)]
        if name == "scaled_dot_product_attention":
            q, k = _shape(_arg(node, 0, "query")), _shape(_arg(node, 1, "key"))
            v = _shape(_arg(node, 2, "value"))
            if q is None or k is None or len(q) < 2:
                return None
            lq, d = q[-2], q[-1]
            lk = k[-2]
            dv = v[-1] if v is not None else d
            lead = q[:-2]
            f = [("c", 2)]
            if len(lead) >= 1:
                f.append(("l", lead[0]))
                f += [("m", x) for x in lead[1:]]
            return f + [("d", lq), ("d", lk), ("m", d + dv)]
        if name.startswith("conv") and not name.startswith("conv_transpose"):
            out, w = _shape(node), _shape(_arg(node, 1, "weight"))
            if out is None or w is None or len(out) < 3:
                return None
            return ([("c", 2), ("l", out[0]), ("m", out[1]), ("sp", math.prod(out[2:]))]
                    + [("m", math.prod(w[1:]))])
        if name == "einsum":
            return _einsum_factors(node)
    except (IndexError, TypeError, ValueError):
        return None
    return None


def _einsum_factors(node) -> Optional[list[tuple[str, int]]]:
    eq = node.args[0] if node.args else None
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        return None
    lhs, rhs = eq.replace(" ", "").split("->")
    sizes: dict[str, int] = {}
    for spec, op in zip(lhs.split(","), ops):
        s = _shape(op)
        if s is None or len(s) != len(spec):
            return None
        for c, d in zip(spec, s):
            sizes[c] = d
    contracted = [c for c in sizes if c not in rhs]
    if not contracted or len(ops) < 2:
        return [("c", 0)]
    return [("c", 2)] + [("e", sizes[c]) for c in sorted(sizes)]


def node_flops(node) -> int:
    """FLOPs of one FX node (0 for anything that is not matmul-like or lacks shapes)."""
    f = _flop_factors(node)
    if f is None:
        return 0
    return int(math.prod(v for _, v in f))


def _is_view(node) -> bool:
    return _name(node) in _VIEW_OPS


def _tensor_inputs(node) -> list:
    seen: dict = {}
    for a in node.all_input_nodes:
        if isinstance(_val(a), torch.Tensor):
            seen.setdefault(a, None)
    return list(seen)


def _nbytes_factors(x) -> Optional[tuple[list[int], int]]:
    v = _val(x)
    if not isinstance(v, torch.Tensor):
        return None
    s = _shape(x)
    if s is None:
        return None
    return s, v.element_size()


def node_bytes(node) -> int:
    """Bytes one FX node reads and writes (0 for views, placeholders and outputs)."""
    if node.op not in ("call_function", "call_method") or _is_view(node):
        return 0
    total = 0
    for t in _tensor_inputs(node) + [node]:
        nf = _nbytes_factors(t)
        if nf is not None:
            total += math.prod(nf[0]) * nf[1]
    return int(total)


def graph_flops(nodes: Iterable) -> int:
    return sum(node_flops(n) for n in nodes)


# ----------------------------------------------------------------------------- symbols


@dataclasses.dataclass
class SizeSymbols:
    """The data sizes of a graph as sympy symbols, and how to recover them from numbers.

    ``values`` maps each symbol to its traced size; ``lead`` / ``seq`` are candidate
    expressions for leading (batch-like) and sequence/spatial dimensions, in priority order;
    ``model_dims`` are the sizes of parameters (kept as numbers where a factor may be either).
    """

    values: dict[sympy.Symbol, int]
    lead: list[sympy.Expr]
    seq: list[sympy.Expr]
    model_dims: set[int]

    def __post_init__(self):
        self._memo: dict = {}

    def symbol(self, name: str) -> Optional[sympy.Symbol]:
        for s in self.values:
            if s.name == name:
                return s
        return None

    def value(self, expr) -> int:
        return int(sympy.sympify(expr).subs(self.values))

    def _find(self, value: int, cands: Sequence[sympy.Expr]) -> Optional[sympy.Expr]:
        for c in cands:
            key = (c, value)
            if self._memo.get(key) is None:
                self._memo[key] = self.value(c) == value
            if self._memo[key]:
                return c
        return None

    def _rows(self) -> list[sympy.Expr]:
        if "rows" not in self._memo:
            one = sympy.Integer(1)
            self._memo["rows"] = ([l * s for l in self.lead for s in self.seq] + list(self.lead)
                                  + list(self.seq) + [one])
        return self._memo["rows"]

    def factor(self, role: str, value: int) -> sympy.Expr:
        """A formula factor of ``role`` (see :func:`_flop_factors`) as an expression."""
        v = int(value)
        if role in ("c", "m") or v <= 0:
            return sympy.Integer(v)
        if role == "l":
            hit = self._find(v, self.lead)
            if hit is None and self.lead:
                b = self.value(self.lead[0])
                if b > 0 and v % b == 0:       # batch times heads (bmm over B*H)
                    return self.lead[0] * (v // b)
            return hit if hit is not None else sympy.Integer(v)
        if role == "e" and v in self.model_dims:
            return sympy.Integer(v)
        if v == 1 and role != "r":
            return sympy.Integer(1)
        if role == "r":
            hit = self._find(v, self._rows())
        else:  # "d", "e", "sp"
            hit = self._find(v, self.seq)
        return hit if hit is not None else sympy.Integer(v)

    def shape(self, dims: Sequence[int], param: bool = False) -> list[sympy.Expr]:
        """A tensor's dimensions: parameters stay numbers; an activation's first dimension
        is leading data, the others data unless a parameter has that size."""
        if param:
            return [sympy.Integer(int(d)) for d in dims]
        out = []
        for i, d in enumerate(dims):
            if i == 0 and len(dims) >= 2:
                out.append(self.factor("l", d))
            else:
                out.append(self.factor("e", d))
        return out


def _clean_input_name(name: str) -> str:
    n = re.sub(r"^(l|L)_", "", name)
    n = re.sub(r"^(kwargs_|args_|self_)", "", n)
    return n.rstrip("_").lower()


_LATENT_NAMES = ("hidden_states", "sample", "x", "latents", "latent_model_input", "img")
_TEXT_NAMES = ("encoder_hidden_states", "context", "txt", "prompt_embeds", "encoder_states")


def size_symbols(inputs: Sequence[tuple[str, Sequence[int], bool]], model_dims: Iterable[int] = ()) -> SizeSymbols:
    """Size symbols of a graph from its user inputs ``(name, shape, is_float)``.

    The latent (an input named like ``hidden_states``, else the float input of highest rank)
    gives ``batch`` and its extents: ``[B, N, C]`` -> ``tokens``; ``[B, C, H, W]`` ->
    ``height``, ``width``; ``[B, C, F, H, W]`` -> ``frames``, ``height``, ``width``.  A
    text input (``encoder_hidden_states``) gives ``text_tokens``.  Channels stay numbers.
    Candidate expressions add patchified sizes (``height*width/p**2`` for p in 1, 2, 4, 8,
    16 where it divides), joint sequences (image + text tokens) and frame products.
    """
    named = [(_clean_input_name(n), list(s), f) for n, s, f in inputs]
    latent = None
    for want in _LATENT_NAMES:
        latent = next((x for x in named if x[0] == want and x[2] and len(x[1]) >= 3), None)
        if latent is not None:
            break
    if latent is None:
        floats = [x for x in named if x[2] and len(x[1]) >= 3]
        latent = max(floats, key=lambda x: (len(x[1]), math.prod(x[1])), default=None)
    text = None
    for want in _TEXT_NAMES:
        text = next((x for x in named if x[0] == want and len(x[1]) == 3 and x is not latent), None)
        if text is not None:
            break
    sym = {n: sympy.Symbol(n, positive=True, integer=True) for n in SIZE_NAMES}
    values: dict[sympy.Symbol, int] = {}
    lead: list[sympy.Expr] = []
    seq: list[sympy.Expr] = []
    spatial: list[sympy.Expr] = []
    if latent is not None:
        s = latent[1]
        values[sym["batch"]] = s[0]
        b = sym["batch"]
        if len(s) == 3:
            values[sym["tokens"]] = s[1]
        elif len(s) == 4:
            values[sym["height"]], values[sym["width"]] = s[2], s[3]
        elif len(s) == 5:
            values[sym["frames"]], values[sym["height"]], values[sym["width"]] = s[2], s[3], s[4]
        if sym["height"] in values:
            h, w = values[sym["height"]], values[sym["width"]]
            for p in (1, 2, 4, 8, 16):
                if h % p == 0 and w % p == 0:
                    spatial.append(sym["height"] * sym["width"] / p ** 2)
        img: list[sympy.Expr] = []
        if sym["tokens"] in values:
            img.append(sym["tokens"])
        if sym["frames"] in values:
            f = sym["frames"]
            img += [f * sp for sp in spatial] + list(spatial) + [f]
            lead = [b, b * f] + [b * sp for sp in spatial]
        else:
            img += spatial
            lead = [b]
        seq = list(img)
        if text is not None:
            values[sym["text_tokens"]] = text[1][1]
            t = sym["text_tokens"]
            seq += [t] + [x + t for x in img]
    elif named:
        s = named[0][1]
        if s:
            values[sym["batch"]] = s[0]
            lead = [sym["batch"]]
    return SizeSymbols(values, lead, seq, {int(d) for d in model_dims})


# ----------------------------------------------------------------------------- Cost


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved, as sympy expressions (numbers are expressions too)."""

    flops: sympy.Expr = sympy.Integer(0)
    bytes: sympy.Expr = sympy.Integer(0)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scale(self, k) -> "Cost":
        return Cost(self.flops * k, self.bytes * k)

    @property
    def free_symbols(self) -> set:
        return set(self.flops.free_symbols) | set(self.bytes.free_symbols)

    def evaluate(self, sizes: Optional[Mapping] = None) -> tuple[int, int]:
        """(flops, bytes) at ``sizes`` ({symbol or name: value}); unknown symbols raise
        ValueError naming them."""
        subs = {}
        for k, v in (sizes or {}).items():
            subs[sympy.Symbol(k, positive=True, integer=True) if isinstance(k, str) else k] = v
        f, b = sympy.sympify(self.flops).subs(subs), sympy.sympify(self.bytes).subs(subs)
        left = (f.free_symbols | b.free_symbols)
        if left:
            raise ValueError(f"cost needs values for {sorted(s.name for s in left)}")
        return int(f), int(b)

    def to_json(self) -> dict:
        return {"flops": str(self.flops), "bytes": str(self.bytes)}

    @classmethod
    def from_json(cls, d: Mapping) -> "Cost":
        loc = {n: sympy.Symbol(n, positive=True, integer=True) for n in SIZE_NAMES}
        return cls(sympy.sympify(d["flops"], locals=loc), sympy.sympify(d["bytes"], locals=loc))


ZERO = Cost()


def node_cost(node, sizes: SizeSymbols, is_param: Callable = lambda n: False) -> Cost:
    """The symbolic :class:`Cost` of one FX node."""
    f = _flop_factors(node)
    flops = sympy.Integer(0)
    if f is not None:
        flops = sympy.Mul(*[sizes.factor(role, v) for role, v in f])
    by = sympy.Integer(0)
    if node.op in ("call_function", "call_method") and not _is_view(node):
        for t in _tensor_inputs(node) + [node]:
            nf = _nbytes_factors(t)
            if nf is not None:
                by += sympy.Mul(*sizes.shape(nf[0], param=t is not node and is_param(t))) * nf[1]
    return Cost(sympy.expand(flops), by)


def region_cost(nodes: Iterable, sizes: SizeSymbols, is_param: Callable = lambda n: False) -> Cost:
    """The :class:`Cost` of a set of nodes (a unit, the prologue, ...), simplified."""
    fl, by = [], []
    for n in nodes:
        c = node_cost(n, sizes, is_param)
        fl.append(c.flops)
        by.append(c.bytes)
    return Cost(sympy.expand(sympy.Add(*fl)), sympy.expand(sympy.Add(*by)))


def graph_size_symbols(gm, is_param: Callable) -> SizeSymbols:
    """:func:`size_symbols` of a Dynamo graph: its user inputs' shapes, with every size of a
    parameter (a placeholder for which ``is_param`` is true) as a model dimension."""
    inputs, model_dims = [], set()
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        ev = n.meta.get("example_value")
        if not isinstance(ev, torch.Tensor):
            continue
        if not all(isinstance(d, int) for d in ev.shape):
            continue               # symbolic sizes (int() of one would guard: specialise the graph)
        shape = tuple(ev.shape)
        if is_param(n):
            model_dims |= set(shape)
        else:
            inputs.append((n.name, shape, ev.dtype.is_floating_point))
    return size_symbols(inputs, model_dims)
