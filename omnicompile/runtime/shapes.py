"""One compiled graph per concrete shape, for rewrites that need concrete sizes.

With automatic dynamic shapes Dynamo compiles a model's second shape with symbolic sizes.
The step caches rewrite such a graph once (their caches take the call's sizes).  The token /
frame / block caches prove each wrapped region at concrete row counts, so for them the
backend returns a :class:`PerShape`: on the first call at a new shape it specialises Dynamo's
graph to that shape (:func:`omnicompile.passes.specialise.specialise`) and compiles it like
any static graph (its own report, state and calibration); later calls of that shape reuse it.

The number of shapes is bounded (:data:`MAX_SHAPES`, Dynamo's own default recompile limit):
past it the oldest shape is evicted (it compiles again when it comes back) and the report
warns once.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Optional

import torch.fx as fx

from omnicompile.passes.specialise import shape_key, specialise, symbolic_inputs

__all__ = ["PerShape", "MAX_SHAPES", "needs_specialising"]

log = logging.getLogger("omnicompile")

#: shapes kept compiled per symbolic graph (torch._dynamo.config.recompile_limit's default)
MAX_SHAPES = 8


def needs_specialising(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` has symbolic sizes (Dynamo's automatic dynamic shapes)."""
    return bool(symbolic_inputs(gm))


class PerShape:
    """The callable for a symbolic graph: ``build(graph, example_inputs)`` compiles the graph
    specialised to each new shape (the backend: it records a report per shape);
    ``on_evict(message)`` is told when a shape is evicted."""

    def __init__(self, gm: fx.GraphModule, build: Callable, on_evict: Callable[[str], None],
                 max_shapes: Optional[int] = None):
        self.gm = gm
        self.positions = symbolic_inputs(gm)
        self.build = build
        self.on_evict = on_evict
        self.max_shapes = MAX_SHAPES if max_shapes is None else max_shapes
        self.compiled: collections.OrderedDict = collections.OrderedDict()
        self.specialisations = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def __call__(self, *args):
        key = shape_key(args, self.positions)
        fn = self.compiled.get(key)
        if fn is None:
            with self._lock:
                fn = self.compiled.get(key)
                if fn is None:
                    fn = self._add(key, args)
        return fn(*args)

    def _add(self, key, args) -> Callable:
        if len(self.compiled) >= self.max_shapes:
            self.compiled.popitem(last=False)
            self.evictions += 1
            if self.evictions == 1:
                msg = (f"a graph with symbolic sizes met more than {self.max_shapes} shapes: the token/frame/block "
                       "caches compile one graph per shape and evict the oldest (it compiles again "
                       "when it returns); keep shapes in few buckets or compile with dynamic=False")
                log.warning("omnicache: %s", msg)
                self.on_evict(msg)
        fn = self.build(specialise(self.gm, args), list(args))
        self.specialisations += 1
        self.compiled[key] = fn
        return fn
