"""Specialise a Dynamo graph with symbolic sizes to one concrete shape.

With automatic dynamic shapes Dynamo hands the backend a graph whose sizes are symbols
(``s0``, ``s1``...): SymInt placeholders, tensors with symbolic dimensions, and size
arithmetic on them (``x.size()``, ``getitem``, ``mul``...).  Most rewrites work on such a
graph (the step caches take their sizes from the call); the token / frame / block caches do
not: their proof re-specialises each region at *concrete* row counts.  For those,
:func:`specialise` makes the graph that Dynamo would have traced for one concrete call:

* every node whose value Dynamo recorded as symbolic (a ``SymInt``/``SymFloat``/``SymBool``,
  or a tuple of them such as ``x.size()``) is folded to its value at the call's sizes, so
  shape arguments are plain constants as in a static graph;
* every node's ``example_value`` is propagated again under a fresh ``FakeTensorMode`` from
  the call's shapes, dtypes and strides (no ``ShapeEnv``: every size is an ``int``).

The specialised graph keeps Dynamo's placeholders (and their sources), so it is called with
the same arguments; the folded SymInt placeholders are simply no longer read.  Calls whose
symbolic sizes differ need another specialisation: :func:`shape_key` says which calls one
specialisation serves.  The graph is a copy; Dynamo's stays untouched.  Data-dependent
sizes (unbacked symbols) cannot be specialised: :class:`~omnicompile.passes.errors.RewriteError`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from .common import Reason, example_value
from .edit import copy_graph_module, placeholders
from .errors import RewriteError

__all__ = ["symbolic_inputs", "shape_key", "specialise", "concrete_args"]

_SYM = (torch.SymInt, torch.SymFloat, torch.SymBool)


def _symbolic(v) -> bool:
    if isinstance(v, _SYM):
        return True
    if isinstance(v, torch.Tensor):
        return any(isinstance(d, torch.SymInt) for d in v.shape) or any(isinstance(s, torch.SymInt)
                                                                         for s in v.stride())
    if isinstance(v, (tuple, list)):
        return any(_symbolic(x) for x in v)
    return False


def symbolic_inputs(gm: fx.GraphModule) -> list[int]:
    """Positions of the placeholders whose value Dynamo recorded with symbolic sizes (SymInt
    inputs and tensors with a symbolic size or stride); empty for a static graph."""
    return [i for i, n in enumerate(placeholders(gm.graph)) if _symbolic(example_value(n))]


def shape_key(args: Sequence, positions: Sequence[int]) -> tuple:
    """What a specialisation is specific to: the sizes and strides of the symbolic inputs of
    a call (``positions`` from :func:`symbolic_inputs`)."""
    key = []
    for i in positions:
        a = args[i]
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.stride()))
        else:
            key.append(a if isinstance(a, (int, float, bool)) else int(a))
    return tuple(key)


def concrete_args(args: Sequence) -> list:
    """Dynamo's example inputs with each SymInt replaced by its hint (the size of the call
    being compiled), without adding a guard; RewriteError where there is no hint."""
    out = []
    for a in args:
        if isinstance(a, torch.SymInt):
            hint = a.node.hint
            if hint is None:
                raise RewriteError.from_reason(Reason("specialise", f"size {a} has no concrete value (data-dependent)", "graph"))
            a = int(hint)
        elif isinstance(a, torch.Tensor) and _symbolic(a):
            raise RewriteError.from_reason(Reason("specialise", "an example input has symbolic sizes", "graph"))
        out.append(a)
    return out


def _scalars(v) -> bool:
    """A size value: a (Sym)Int/Float/Bool or a tuple of them (``x.size()``), no tensors."""
    if isinstance(v, (tuple, list)):
        return all(_scalars(x) for x in v)
    return isinstance(v, _SYM + (int, float, bool))


def _fold(value):
    """A recorded symbolic value made constant (ints stay ints; torch.Size becomes a tuple)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_fold(v) for v in value) if not isinstance(value, torch.Size) else tuple(value)
    return value


def specialise(gm: fx.GraphModule, args: Sequence) -> fx.GraphModule:
    """A copy of ``gm`` specialised to the concrete sizes of ``args`` (one call's inputs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    new, _ = copy_graph_module(gm)
    phs = placeholders(new.graph)
    if len(phs) != len(args):
        raise RewriteError.from_reason(Reason("specialise", f"{len(args)} arguments for {len(phs)} graph inputs", "graph"))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    vals: dict[fx.Node, object] = {}
    fold: list[tuple[fx.Node, object]] = []

    def val(x):
        return fx.node.map_arg(x, lambda n: vals[n])

    with mode:
        for n in list(new.graph.nodes):
            recorded = example_value(n)
            if n.op == "placeholder":
                a = args[phs.index(n)]
                v = (torch.empty_strided(tuple(a.shape), a.stride(), dtype=a.dtype, device=a.device)
                     if isinstance(a, torch.Tensor) else a)
                if isinstance(a, torch.nn.Parameter):
                    v = torch.nn.Parameter(v, requires_grad=a.requires_grad)
            elif n.op == "output":
                continue
            else:
                fa, fk = val(n.args), val(n.kwargs)
                try:
                    if n.op == "call_function":
                        v = n.target(*fa, **fk)
                    elif n.op == "call_method":
                        v = getattr(fa[0], n.target)(*fa[1:], **fk)
                    elif n.op == "call_module":
                        v = new.get_submodule(n.target)(*fa, **fk)
                    else:   # get_attr
                        v = new
                        for part in n.target.split("."):
                            v = getattr(v, part)
                except Exception as e:   # e.g. a data-dependent size: no concrete graph exists
                    raise RewriteError.from_reason(Reason("specialise", f"{n.name} cannot be evaluated at the call's sizes: "
                                              f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
                                              n.name)) from None
            vals[n] = v
            if _symbolic(recorded) and _scalars(recorded):
                if _symbolic(v):
                    raise RewriteError.from_reason(Reason("specialise", f"{n.name} stays symbolic at the call's sizes "
                                              "(a data-dependent size)", n.name))
                fold.append((n, _fold(v)))
            if "example_value" in n.meta or "val" in n.meta or n.op == "placeholder":
                n.meta["example_value"] = v
                n.meta.pop("val", None)
    for n, const in fold:
        for user in list(n.users):
            user.args = fx.node.map_arg(user.args, lambda m, n=n, c=const: c if m is n else m)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda m, n=n, c=const: c if m is n else m)
    for n, _ in reversed(fold):
        if n.op != "placeholder" and not n.users:
            new.graph.erase_node(n)
    new.graph.lint()
    new.recompile()
    return new
