"""Measured costs on the machine at hand, for the choices a cost model alone gets wrong.

* :func:`measure` — the fastest run of a callable after a warm-up (the device synchronised).
* :func:`node_seconds` — the seconds of every node of a graph, run eagerly once on its real
  example inputs by an :class:`torch.fx.Interpreter` that times each node.
* :func:`writes_in_place` — whether running a graph once more would write into its inputs.

What a reuse of the spans saves (``target_cost="measured"``) is their share of those seconds
(:func:`omnicompile.targets.saved_fraction`).  The FLOP share overstates it wherever the ops outside the spans (embeddings, norms, the patchify, the final
  layer) cost time but few FLOPs — on small models and on a CPU by 5–10 %
  (``bench/RESULTS.md``), which is what put the measured speedups 6–19 % under their target.

The interpreter runs the graph eagerly, so the share is eager's; Inductor's fusion shrinks the
elementwise glue outside the spans, so under Inductor the true share lies between this one and
the FLOP share.  One eager forward at compile time; nothing is kept of it but the seconds.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.fx as fx

__all__ = ["sync", "measure", "node_seconds", "writes_in_place"]


def sync(device) -> None:
    """Wait for ``device`` (a no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, device, repeats: int = 5) -> float:
    """The fastest of ``repeats`` runs of ``fn()`` after one warm-up run, in seconds (no
    autograd): other load on the machine only ever slows a run down."""
    with torch.no_grad():
        fn()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return min(times)


class _Timed(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, device):
        super().__init__(gm)
        self.device = device
        self.seconds: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        sync(self.device)
        t0 = time.perf_counter()
        out = super().run_node(n)
        sync(self.device)
        self.seconds[n.name] = time.perf_counter() - t0
        return out


def _device(example_inputs) -> Optional[torch.device]:
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return None


#: ops whose output may alias their first input (a write into it reaches the input)
_ALIASING = {"view", "reshape", "transpose", "permute", "getitem", "select", "slice", "unsqueeze", "squeeze",
             "expand", "narrow", "flatten", "unflatten", "t", "as_strided", "contiguous", "view_as", "chunk",
             "split", "unbind", "movedim", "detach", "to", "type_as", "expand_as"}


def _name(target) -> str:
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.split(".")[-1]


def writes_in_place(gm: fx.GraphModule) -> Optional[str]:
    """The first node of ``gm`` that writes in place (``add_``, ``copy_``, ``setitem``) into one
    of the graph's inputs or a view of one, or None.  Such a graph is never run an extra time
    to be timed: the write would land on the caller's tensors (writes into the graph's own
    intermediates are harmless)."""
    import operator

    def reaches_input(x) -> bool:
        while isinstance(x, fx.Node):
            if x.op == "placeholder":
                return True
            if x.op not in ("call_function", "call_method") or _name(x.target) not in _ALIASING or not x.args:
                return False
            x = x.args[0]
        return False

    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or not n.args:
            continue
        name = _name(n.target)
        if n.target is operator.setitem or (name.endswith("_") and not name.endswith("__")):
            if reaches_input(n.args[0]):
                return n.name
    return None


def _concrete(a):
    """A symbolic size input (``dynamic=True``) as the size it was traced at."""
    if isinstance(a, torch.SymInt):
        hint = getattr(a.node, "hint", None)
        if hint is None:
            raise ValueError("a symbolic size input without a traced value: cannot time the graph")
        return int(hint)
    return a


def node_seconds(gm: fx.GraphModule, example_inputs: list, rounds: int = 2) -> dict[str, float]:
    """Seconds of every computing node of ``gm`` (name -> the fastest of ``rounds`` timed runs,
    after a warm-up run), run eagerly on ``example_inputs``."""
    device = _device(example_inputs)
    example_inputs = [_concrete(a) for a in example_inputs]
    best: dict[str, float] = {}
    with torch.no_grad():
        for r in range(rounds + 1):
            it = _Timed(gm, device)
            it.run(*example_inputs)
            if r == 0:
                continue
            for k, v in it.seconds.items():
                best[k] = min(v, best.get(k, v))
    return best
