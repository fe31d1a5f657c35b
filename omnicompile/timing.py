"""Measured costs on the machine at hand, for the choices a cost model alone gets wrong.

* :func:`measure` — the fastest run of a callable after a warm-up (the device synchronised).
* :func:`node_seconds` — the seconds of every node of a graph, run eagerly once on its real
  example inputs by an :class:`torch.fx.Interpreter` that times each node.
* :func:`writes_in_place` — whether running a graph once more would write into its inputs.
* :class:`CallTimer` — a rewritten graph's eager time as a multiple of the graph it was
  rewritten from, on the same real inputs (what a computed and a reused call cost, the cache's
  own work included: :class:`omnicompile.targets.CallCosts`).

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

from omnicompile.passes.collectives import host_sum

__all__ = ["sync", "measure", "node_seconds", "writes_in_place", "CallTimer"]


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


class CallTimer:
    """Times rewritten graphs against Dynamo's graph ``gm`` on its real example inputs, eagerly.
    :meth:`ratios` of graphs taking the original inputs plus their extra inputs: each one's time
    over ``gm``'s — all of them run in turn, ``repeats`` rounds after a warm-up round, each the
    fastest of its runs (a drift of the machine's speed hits them alike).  Under context
    parallelism (``group``) the times are summed over the group first, so every rank gets the
    same ratios (every rank must time the same graphs in the same order).  The timer holds the
    caller's tensors and the model's parameters: :meth:`close` drops them (the backend closes it
    as soon as the runtime is built)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, group=None, repeats: int = 5):
        self.gm, self.group, self.repeats = gm, group, repeats
        self.inputs: Optional[list] = [_concrete(a) for a in example_inputs]
        self.device = _device(self.inputs)

    def zeros(self, specs) -> list[torch.Tensor]:
        """Real zero tensors for state specs (``.shape``/``.dtype``; symbolic sizes at their
        traced values), on the graph's device."""
        return [torch.zeros(tuple(_concrete(d) for d in s.shape), dtype=s.dtype, device=self.device)
                for s in specs]

    def ratios(self, configs: list) -> list[float]:
        """For each ``(graph, extra)`` in ``configs``: ``graph(*inputs, *extra)``'s time over
        ``gm(*inputs)``'s."""
        if self.inputs is None:
            raise RuntimeError("CallTimer: closed (the example inputs were released)")
        inputs = self.inputs
        fns = [lambda: self.gm(*inputs)] + [lambda g=g, x=x: g(*inputs, *x) for g, x in configs]
        best = [float("inf")] * len(fns)
        with torch.no_grad():
            for r in range(self.repeats + 1):
                for i, fn in enumerate(fns):
                    sync(self.device)
                    t0 = time.perf_counter()
                    fn()
                    sync(self.device)
                    if r:
                        best[i] = min(best[i], time.perf_counter() - t0)
        best = host_sum(best, self.group)
        return [b / max(best[0], 1e-12) for b in best[1:]]

    def close(self) -> None:
        self.inputs = None
