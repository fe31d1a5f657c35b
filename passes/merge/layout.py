"""Row layouts and the vocabulary the tracer, the proof and the rewrite share.

A :class:`Layout` says how the rows of one dim are made: segments (concatenated), each a
row-major product of factors — integers, or the merged axis as a symbol (see "Re-specialisation
and its proof" in the package docstring).  A region is recorded as *templates*: its nodes'
arguments with :class:`Size` where an integer depends on the axis size and :class:`Ref` where
a node is named; :func:`materialize` evaluates them at one size.  :class:`Refuse` is how the
tracer, the proof and the planner's analysis give up on a region (the planner turns it into a
:class:`~omnicompile.passes.common.Reason`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
import torch.fx as fx

__all__ = ["Refuse", "Layout", "Size", "Ref", "materialize", "map_args", "int_args", "target_name", "op_name",
           "VIEWS", "OP_FAILURES"]


class Refuse(Exception):
    """A region cannot be merged: ``code`` (stable, as in a Reason), ``message``, the node where
    it failed (when known) and, from a trace, the tracer that got that far."""

    def __init__(self, code: str, message: str, node: Optional[fx.Node] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.node = node
        self.tracer = None


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


# ----------------------------------------------------------------------------- templates


@dataclasses.dataclass(frozen=True)
class Size:
    """An integer argument that depends on the axis size (materialised per size)."""
    layout: Layout


@dataclasses.dataclass(frozen=True)
class Ref:
    """A node of a template, by name (a wrap outlives the graph it was planned on)."""
    name: str


def materialize(obj, nodes: dict, env: dict):
    """``obj`` (a template) with each node replaced by ``nodes[node]`` and each :class:`Size`
    evaluated at the axis sizes ``env``."""
    def f(a):
        if isinstance(a, fx.Node):
            return nodes[a]
        if isinstance(a, Size):
            return a.layout.value(env)
        return a
    return map_args(obj, f)


def map_args(obj, f):
    """Apply ``f`` to every leaf of nested tuples, lists, dicts and slices (like ``fx.map_arg``,
    for any leaf)."""
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(map_args(o, f) for o in obj)
    if isinstance(obj, list):
        return [map_args(o, f) for o in obj]
    if isinstance(obj, dict):
        return {k: map_args(v, f) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(map_args(obj.start, f), map_args(obj.stop, f), map_args(obj.step, f))
    return f(obj)


def int_args(obj) -> list[int]:
    """Every integer (not bool) in ``obj``."""
    out: list[int] = []

    def f(a):
        if isinstance(a, int) and not isinstance(a, bool):
            out.append(a)
        return a
    map_args(obj, f)
    return out


# ----------------------------------------------------------------------------- ops


def target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    name = getattr(t, "__name__", str(t))
    if isinstance(t, torch._ops.OpOverload):
        name = t._schema.name.split("::")[-1]
    return name


#: what running an op on fake tensors raises when torch refuses it (a failed broadcast, a size it
#: cannot decide: the symbolic-shape and fake-tensor errors are RuntimeErrors, argument checks
#: TypeError / ValueError / IndexError, unsupported ops NotImplementedError).  The tracer and the
#: proof turn exactly these into refusals of the region; anything else (AttributeError, KeyError,
#: NameError, ...) is a bug of ours and propagates.
OP_FAILURES = (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError)

#: ops that regroup rows (their size arguments are re-specialised; the proof checks them through
#: their output shapes)
VIEWS = {"view", "reshape", "_unsafe_view", "_reshape_alias"}


def op_name(n: fx.Node) -> str:
    return target_name(n) if n.op in ("call_function", "call_method") else ""
