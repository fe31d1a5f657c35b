"""A plain-PyTorch reference executing the decisions a report says were taken (test helper).

:class:`Recorder` is a ``torch.compile`` backend wrapping an :class:`omnicompile.OmniCache`: it
keeps, per compiled graph, Dynamo's graph, the runtime, and the inputs and outputs of every
call.  :func:`replay` then runs each call again with ``torch.fx.Interpreter`` on Dynamo's
*original* graph — not on any graph omnicompile built — applying the step record's decision for
each span with the textbook semantics of the residual cache:

* computed: the span's nodes run; the cache of (model, generation, CFG slot, span) becomes
  ``out - base`` of each live stream;
* reused: the span's nodes are skipped (those it must keep run); each stream output is
  ``base + cache``, the cache of the *same* model, generation and slot — a reuse with no such
  cache is an error of the runtime.

``base`` is the stream's input plus the side values this call adds into it between the span's
blocks (``Stream.adds``: ControlNet residuals, VACE hints), ``in`` where there are none.

With the static policy's ``extrapolate`` (the runtime's ``extrapolate``) the cache of a span is
its last two computed residuals with their steps ``s0 < s1`` and a coefficient ``alpha``; a
reuse at step ``s`` adds ``r1 + alpha (s - s1) / (s1 - s0) (r1 - r0)`` (``r1`` alone before two
computes, or when ``r0`` held a NaN/inf); a compute at step ``s`` fits the next ``alpha`` by
least squares — ``e = new - r1``, ``u = (s - s1) / (s1 - s0) (r1 - r0)``, ``alpha =
clip(<e, u> / <u, u>, 0, 1)`` over the span's streams, 0 when ``<u, u>`` is 0 or the ratio not
finite (written here in float64, independently of the rewrite).

Every call's outputs must equal the recorded ones: a runtime that reuses another model's,
generation's or slot's residual, or runs a decision other than the one it reports, fails.
Covers the host-decided policies (``static``, ``layered``, plugins); the trajectory's correction
and the probe's alignment have references of their own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.fx as fx

from omnicompile.passes.common import is_param_placeholder

__all__ = ["Recorder", "GraphCalls", "replay", "replay_all"]


@dataclasses.dataclass
class GraphCalls:
    gm: fx.GraphModule
    runtime: Any          # None when the graph was compiled unchanged
    report: Any
    calls: list = dataclasses.field(default_factory=list)      # [(args, outputs)]


class Recorder:
    """``torch.compile(model, backend=Recorder(oc))``: records every graph's calls."""

    def __init__(self, oc):
        self.oc = oc
        self.graphs: list[GraphCalls] = []
        self.__name__ = "omnicache_recorder"

    def __call__(self, gm, example_inputs):
        fn = self.oc(gm, example_inputs)
        compiled = self.oc.graphs[-1]
        rec = GraphCalls(gm, compiled.runtime, compiled.report)
        self.graphs.append(rec)
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        params = {i for i, n in enumerate(phs) if is_param_placeholder(n)}

        def run(*args):
            out = fn(*args)
            kept = [a if i in params or not isinstance(a, torch.Tensor) else a.detach().clone()
                    for i, a in enumerate(args)]
            outs = out if isinstance(out, (tuple, list)) else (out,)
            rec.calls.append((kept, [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outs]))
            return out
        return run


def replay(rec: GraphCalls, atol: float = 1e-5, rtol: float = 1e-5, equal_nan: bool = False) -> dict:
    """Re-run every recorded call of one graph with the reference; returns counts
    ``{"calls", "reused", "computed"}``.  Raises AssertionError on the first mismatch
    (``equal_nan``: a NaN must match a NaN, for inputs that hold one)."""
    assert rec.runtime is not None, "the graph was compiled unchanged: nothing to replay"
    rec.runtime.flush()
    steps = rec.report.steps
    assert len(steps) == len(rec.calls), f"{len(rec.calls)} calls but {len(steps)} step records"
    spans = {s.name: s for s in rec.runtime.known_spans()}
    cache: dict = {}
    counts = {"calls": 0, "reused": 0, "computed": 0}
    extrapolate = bool(getattr(rec.runtime, "extrapolate", False))
    for (args, outs), step in zip(rec.calls, steps):
        key = (step.model, step.generation, step.slot)
        decided = [(spans[name], d) for name, d in step.decisions.items()]
        want = _Reference(rec.gm, decided, cache.setdefault(key, {}), key,
                          step=step.step if extrapolate else None).run(*args)
        want = want if isinstance(want, (tuple, list)) else (want,)
        assert len(want) == len(outs)
        for i, (w, o) in enumerate(zip(want, outs)):
            if isinstance(w, torch.Tensor):
                where = f"call {counts['calls']} (model, generation, slot {key}, step {step.step}, {step.decisions})"
                torch.testing.assert_close(o, w, atol=atol, rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"{where}, output {i}: {m}")
        counts["calls"] += 1
        counts["reused"] += sum(d == "reused" for d in step.decisions.values())
        counts["computed"] += sum(d == "computed" for d in step.decisions.values())
    return counts


def replay_all(recorder: Recorder, **kw) -> dict:
    """:func:`replay` every cached graph of a recorder; summed counts (graphs compiled unchanged
    are skipped and counted in ``"unchanged"``)."""
    total = {"calls": 0, "reused": 0, "computed": 0, "unchanged": 0, "graphs": 0}
    for rec in recorder.graphs:
        if rec.runtime is None:
            total["unchanged"] += 1
            continue
        total["graphs"] += 1
        for k, v in replay(rec, **kw).items():
            total[k] += v
    return total


def _ratio(win: dict, step: int) -> float:
    s0, s1 = win["steps"]
    return (step - s1) / (s1 - s0) if s0 is not None and s1 > s0 else 0.0


def _extrapolated(win: dict, step: int) -> list:
    r1, r0 = win["last"], win["prev"]
    if r0 is None or not all(torch.isfinite(t).all() for t in r0):
        return r1
    a = win["alpha"] * _ratio(win, step)
    return [x1 + a * (x1 - x0) for x0, x1 in zip(r0, r1)]


def _fit(win: dict, new: list, step: int) -> float:
    r1, r0 = win["last"], win["prev"]
    if r1 is None or r0 is None or not all(torch.isfinite(t).all() for t in r0):
        return 0.0
    k = _ratio(win, step)
    d = lambda t: t.detach().double()                                                    # noqa: E731
    num = sum(float(((d(n) - d(x1)) * (d(x1) - d(x0)) * k).sum()) for n, x0, x1 in zip(new, r0, r1))
    den = sum(float((((d(x1) - d(x0)) * k) ** 2).sum()) for x0, x1 in zip(r0, r1))
    if not den > 0 or not math.isfinite(num / den):
        return 0.0
    return min(1.0, max(0.0, num / den))


class _Reference(fx.Interpreter):
    def __init__(self, gm, decided: dict, cache: dict, key, step=None):
        super().__init__(gm, garbage_collect_values=False)
        self.cache, self.key, self.step = cache, key, step
        self.windows = cache.setdefault(("window",), {})   # extrapolate: span name -> window
        self.pending: dict = {}                              # span name -> its window before this compute
        self.skip: set = set()
        self.reuse_at: dict = {}       # node -> [(stream output, stream input, residual)]
        self.store_at: dict = {}       # stream output node -> (span name, index, count, stream input)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        for sp, d in decided:
            live = sp.live_streams
            if d == "reused":
                if sp.name not in cache:
                    raise AssertionError(f"{key}: span {sp.name} reused without a cache of its own model, "
                                         "generation and slot")
                keep = set(sp.keep)
                self.skip |= {n for n in sp.nodes if n not in keep}
                last = max(sp.nodes, key=lambda n: order[n])
                res = cache[sp.name]
                if step is not None and sp.name in self.windows:
                    res = _extrapolated(self.windows[sp.name], step)
                self.reuse_at.setdefault(last, []).extend((s.output, s, r) for s, r in zip(live, res))
            else:
                if step is not None:     # the window shifts once this compute's residuals are all in
                    self.pending[sp.name] = self.windows.get(
                        sp.name, {"last": None, "prev": None, "steps": (None, None), "alpha": 0.0})
                cache.pop(sp.name, None)
                for i, s in enumerate(live):
                    self.store_at[s.output] = (sp.name, i, len(live), s)

    def base(self, s):
        """The stream's input plus this call's side values added into it inside the span."""
        b = self.env[s.input]
        for h in s.adds:
            b = b + self.env[h]
        return b

    def run_node(self, n):
        out = None if n in self.skip else super().run_node(n)
        for o, s, r in self.reuse_at.get(n, []):
            self.env[o] = self.base(s) + r
            if o is n:
                out = self.env[o]
        if n in self.store_at:
            name, i, count, s = self.store_at[n]
            res = self.cache.setdefault(name, [None] * count)
            res[i] = out - self.base(s)
            w = self.pending.get(name)
            if w is not None and all(r is not None for r in res):
                del self.pending[name]
                self.windows[name] = {"last": list(res), "prev": w["last"], "steps": (w["steps"][1], self.step),
                                      "alpha": _fit(w, res, self.step)}
        return out
