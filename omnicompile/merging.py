"""Runtime side of the token, frame and block caches (``token_ratio``, ``frame_ratio``,
``block_ratio``; the graph side is :mod:`omnicompile.passes.merge`).

The caches are a layer under any step policy, which does not know about them: the backend
plans the wrapped regions once on Dynamo's graph (:meth:`MergeLayer.for_graph`, configured by
one :class:`~omnicompile.passes.merge.MergeOptions` — the config's ``token_ratio`` …
``merge_refresh``), then hands the policy's runtime a :class:`MergeCompiler` in place of the
inner compiler (``RuntimeContext.compile_fn``).  Every graph the runtime compiles (its computed and reused
variants, the trajectory's compute graph, ...) is rewritten by
:func:`~omnicompile.passes.merge.apply_merge` for the regions it still holds — a
region inside a reused span is gone from that variant, so *a step-reused unit is not
merged* — and the returned :class:`MergedCallable` keeps the signature the runtime expects:
it appends the cache state to the arguments, strips the new state from the results and keeps
it per CFG slot.  Each callable holds two compiled graphs: the *full* one (nothing merged; its
outputs seed the state) for the first call of a slot in a generation, and the *merged* one,
compiled on first use (``merge_fill="interpolate"`` holds no state: an empty marker per region
keeps the same full-then-merged schedule).  Generations and slots come from the step runtime's
:mod:`~omnicompile.runtime.placement` (the runtime's session of each call); with no step policy
(``policy="none"``, or no cacheable span) :class:`MergeRuntime` is the runtime.

Rotation and refresh: :class:`MergeState` counts the calls of each slot in a generation
(``k``; the step index with no step policy — a step policy's reused steps call a graph
without the regions and are not counted, so both advance on computed steps).  The merged
graph takes the split index tensors as inputs; with ``merge_rotate`` the callable passes the
set of phase ``k % phases`` (precomputed on the host, one merged graph for all phases).  With
``merge_refresh=N`` a call with ``k % N == 0`` runs the full graph and re-seeds the state.

Regions inside ``torch.cond`` branches (``guard="cond"``, the probe policy's guarded blocks)
are not visible to the rewrite and run unmerged; the report says so.  No host sync is added:
``r`` is a compile-time constant, the rows are chosen on the device, the phase and the
refresh are host integers.

Non-finite state: both graphs also return a flag "every new state tensor is finite" (computed
in the graph, fused with the state's producer).  The slot's next call reads it on the host —
after the step runtime's timestep read has synchronised, so no extra wait — and runs the full
graph instead of replaying a NaN/inf row into the skipped rows
(``report.token_cache["nonfinite_refreshes"]``).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from omnicompile.passes.collectives import cp_group
from omnicompile.passes.common import Reason
from omnicompile import merge_cost
from omnicompile.passes.merge import AXES, MergeOptions, MergePlan, apply_merge, plan_merge, state_specs
from omnicompile.preview import Preview
from omnicompile.runtime.base import Runtime, call_compiled

log = logging.getLogger("omnicompile")

#: (session, CFG slot) of the call a runtime is running (MergeLayer.serving)
_SERVING: contextvars.ContextVar = contextvars.ContextVar("omnicompile_merge_serving", default=None)

__all__ = ["MergeLayer", "MergeState", "MergeCompiler", "MergedCallable", "MergeRuntime"]


class MergeLayer:
    """The token / frame / block caches of one compiled graph: the plan, the state, and the
    compiler that wraps the inner backend."""

    def __init__(self, plan: MergePlan, report):
        self.plan = plan
        self.state = MergeState(plan, report)

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, blocks, options: MergeOptions, report, strict: bool = False) -> "MergeLayer":
        """Plan the caches on ``gm`` (refusals in ``.refused``; ``.wraps`` empty when nothing is
        wrapped).  A planning bug refuses everything (``merge_failed``) unless ``strict``."""
        group = cp_group(gm.graph)
        if group is not None:     # the kept rows would be chosen per shard, ranks apart: refused
            why = Reason("merge_context_parallel", f"the graph runs under context parallelism (collectives over "
                         f"group {group}): the token/frame/block caches would pick kept rows per shard; not "
                         "supported, the step caches still apply")
            return cls(MergePlan([], [why], None, options), report)
        on = [a for a in AXES if options.ratio(a) > 0]
        try:
            if len(on) > 1 and all(options.auto(a) for a in on):
                plan = _best_axes(gm, blocks, options, on, strict)
            else:
                plan = plan_merge(gm, blocks, options)
                if plan.wraps:   # the predicted saving of each region; "auto" keeps those where it is positive
                    kept, why = merge_cost.gate(gm, plan, strict=strict)
                    plan = MergePlan(kept, list(plan.refused) + why, plan.geometry, options)
        except Exception as e:
            if strict:
                raise
            log.exception("omnicache: token cache planning failed")
            plan = MergePlan([], [Reason("merge_failed", f"{type(e).__name__}: {e}")], None, options)
        return cls(plan, report)

    @property
    def wraps(self) -> list:
        return self.plan.wraps

    @property
    def refused(self) -> list:
        return self.plan.refused

    def compiler(self, inner: Callable) -> "MergeCompiler":
        return MergeCompiler(inner, self.plan, self.state)

    @contextlib.contextmanager
    def serving(self, session, slot: int):
        """While a runtime runs a compiled graph for one call: the state lives in the call's
        session (one model in one generation), under its CFG slot."""
        token = _SERVING.set((session, slot))
        try:
            yield
        finally:
            _SERVING.reset(token)

    @staticmethod
    def rewritten(fn) -> dict[str, tuple[fx.GraphModule, str]]:
        """The graphs the layer made of one compiled graph ``fn`` (a :class:`MergedCallable`;
        nothing for a graph that holds no wrapped region): ``{suffix: (graph, signature)}``."""
        if not isinstance(fn, MergedCallable):
            return {}
        return {"merge_full": (fn.full_graph, "(*inputs) -> (*outputs, *merge state: each wrapped region's "
                               "output, or its residual)"),
                "merged": (fn.merged_graph, "(*inputs, *merge state, *split index tensors) -> (*outputs, "
                           "*merge state')")}


def _best_axes(gm, blocks, options: MergeOptions, axes: list, strict: bool) -> MergePlan:
    """Every axis at ``"auto"``: each planned and gated alone, then per block the axis with the
    largest positive predicted saving (a block one axis would lose on may pay on another)."""
    best: dict = {}
    refused: list = []
    geometry = None
    for a in axes:
        alone = dataclasses.replace(options, **{f"{x}_ratio": (getattr(options, f"{x}_ratio") if x == a else 0.0)
                                                 for x in AXES})
        plan = plan_merge(gm, blocks, alone)
        geometry = geometry or plan.geometry
        kept, why = merge_cost.gate(gm, plan, strict=strict) if plan.wraps else ([], [])
        refused += [r for r in list(plan.refused) + why if r not in refused]
        for w in kept:
            if w.block not in best or w.predicted["saving_ms"] > best[w.block].predicted["saving_ms"]:
                best[w.block] = w
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    wraps = sorted(best.values(), key=lambda w: order[w.region[0]])
    return MergePlan(wraps, refused, geometry, options)


class MergeState:
    """The caches' state: per session (one model in one generation stream — the runtime says
    which, :meth:`MergeLayer.serving`) and CFG slot, the last output (or residual) of every
    wrapped region, keyed ``block:output``, and the calls of each slot so far (a new
    generation starts with an empty session)."""

    def __init__(self, plan: MergePlan, report):
        self.plan = plan
        self.report = report
        tc = report.token_cache
        tc.update({"geometry": plan.geometry.describe() if plan.geometry else None,
                   "wrapped": [w.describe() for w in plan.wraps], "merged_calls": 0, "full_calls": 0,
                   "refresh_calls": 0, "refresh": plan.refresh, "flops_saved": 0, "unmerged_graphs": 0,
                   "nonfinite_refreshes": 0})

    @staticmethod
    def _where() -> tuple[dict, int]:
        serving = _SERVING.get()
        if serving is None:
            raise RuntimeError("a merged graph ran outside its runtime (MergeLayer.serving)")
        session, slot = serving
        return session.merge, slot

    def _slot(self) -> dict:
        store, slot = self._where()
        return store.setdefault(("slot", slot), {})

    def tick(self) -> int:
        """The index of this call among its slot's calls in the generation (then counts it):
        the step index with no step policy; a step policy's reused steps are not counted (they
        call a graph without the regions), so rotation and refresh advance on computed steps."""
        store, slot = self._where()
        calls = store.setdefault("calls", {})
        k = calls.get(slot, 0)
        calls[slot] = k + 1
        return k

    def lookup(self, keys: list[str]) -> Optional[list[torch.Tensor]]:
        st = self._slot()
        if all(k in st for k in keys):
            return [st[k] for k in keys]
        return None

    def store(self, keys: list[str], values) -> None:
        st = self._slot()
        for k, v in zip(keys, values):
            st[k] = v

    def store_flag(self, keys: list[str], flag: torch.Tensor) -> None:
        """Keep the device flag "the state just stored for ``keys`` is finite" (read by :meth:`finite`)."""
        self._slot()[("finite",) + tuple(keys)] = flag

    def finite(self, keys: list[str]) -> bool:
        """Is the state held for ``keys`` finite?  Reads the flag its graph returned on the host
        (once, at the slot's next call: the step runtime's timestep read has already
        synchronised the stream by then, so no extra wait on a GPU)."""
        st = self._slot()
        flag = st.get(("finite",) + tuple(keys))
        if isinstance(flag, torch.Tensor):
            flag = bool(flag)
            st[("finite",) + tuple(keys)] = flag
        return flag is not False


class MergeCompiler:
    """Stands in for the inner compiler: ``MergeCompiler(inner, plan, state)(g, examples)``."""

    def __init__(self, inner: Callable, plan: MergePlan, state: MergeState):
        self.inner = inner
        self.plan = plan
        self.state = state

    def __call__(self, g: fx.GraphModule, example_inputs: list):
        full, present, _ = apply_merge(g, self.plan, merged=False, finite=True)
        hidden = _in_branches(g, self.plan)
        if hidden:
            self.state.report.token_cache["unmerged_graphs"] += 1
            why = Reason("merge_in_cond", "regions inside torch.cond branches run unmerged: "
                         + ", ".join(hidden), "guard=cond")
            if why not in self.state.report.refused:
                self.state.report.refused.append(why)
        if not present:
            return self.inner(g, example_inputs)
        return MergedCallable(self, g, list(example_inputs), full, present)


def _in_branches(g: fx.GraphModule, plan: MergePlan) -> list[str]:
    """Planned regions whose nodes sit inside a submodule (a ``torch.cond`` branch) of ``g``."""
    names = set()
    for _, mod in g.named_modules():
        if mod is not g and isinstance(mod, fx.GraphModule):
            names |= {n.name for n in mod.graph.nodes}
    return [w.block for w in plan.wraps if w.region and w.region[-1] in names]


class MergedCallable:
    """One compiled graph with its wrapped regions: picks the full or merged version per call."""

    def __init__(self, compiler: MergeCompiler, g: fx.GraphModule, example_inputs: list,
                 full: fx.GraphModule, present: list):
        self.compiler = compiler
        self.g = g
        self.example_inputs = example_inputs
        self.present = present
        self.specs = state_specs(present)
        self.keys = [name for name, _, _ in self.specs]
        # fill="interpolate" holds no state; an empty marker per region still makes the first
        # call of a slot in a generation the full one (the same schedule as the other fills)
        self.marks = [f"{w.block}:ran" for w in present if w.fill == "interpolate"]
        self.saved = sum(w.flops_full - w.flops_merged for w in present)
        self.full_graph = full
        self.consts: list[torch.Tensor] = []
        self.phases: list[list[torch.Tensor]] = []     # split index tensors per rotation phase
        # the rewrite now (the dumps show it), its compilation on the first merged call
        self.merged_graph, _, self.consts = apply_merge(g, compiler.plan, merged=True, phases=self.phases,
                                                        finite=True)
        self.flagged = bool(self.keys)      # both graphs return a finiteness flag of the new state, last
        self._full = compiler.inner(full, example_inputs)
        self._merged = None

    def _state_examples(self) -> list[torch.Tensor]:
        dev = self.present[0].device
        return [torch.zeros(shape, dtype=dtype, device=dev) for _, shape, dtype in self.specs]

    def merged(self):
        if self._merged is None:
            self._merged = self.compiler.inner(self.merged_graph,
                                               self.example_inputs + self._state_examples() + self.consts)
        return self._merged

    def __call__(self, *args):
        state = self.compiler.state
        tc = state.report.token_cache
        k = state.tick()
        prev = state.lookup(self.keys + self.marks)
        if prev is not None:
            prev = prev[:len(self.keys)]
        refresh = self.compiler.plan.refresh
        if prev is not None and refresh is not None and k % refresh == 0:
            prev = None                       # merge_refresh: a full call refreshes every row
            tc["refresh_calls"] += 1
        if prev is not None and self.flagged and not state.finite(self.keys):
            prev = None                       # never replay a non-finite cached row: compute them all
            tc["nonfinite_refreshes"] += 1
        if prev is None:
            outs = call_compiled(self._full, list(args))
            tc["full_calls"] += 1
        else:
            fn = self.merged()
            outs = call_compiled(fn, list(args) + prev + self.phases[k % len(self.phases)])
            tc["merged_calls"] += 1
            tc["flops_saved"] += self.saved
        if self.flagged:
            state.store_flag(self.keys, outs[-1])
            outs = outs[:-1]
        n = len(self.keys)
        state.store(self.keys, [t.contiguous() for t in outs[len(outs) - n:]])   # the merged graph's layout
        if self.marks:
            state.store(self.marks, [_MARK] * len(self.marks))
        return outs[:len(outs) - n]


_MARK = torch.empty(0)


class MergeRuntime(Runtime):
    """The token / frame / block caches without a step policy: one graph, every step computed
    (merged wherever a cache is held)."""

    def __init__(self, ctx):
        super().__init__(ctx, [])
        self.merge: MergeLayer = ctx.merge
        self._fn = self.compile("tokens", self.gm, [], "(*inputs) -> (*outputs): the merge layer keeps its state")

    def __call__(self, *args):
        call = self.advance(args)
        outs = self.invoke(call, self._fn, list(args))
        self.record(call, {}, 0)
        return tuple(outs)

    def preview(self, steps: int) -> Preview:
        return Preview.computed(steps, [], self.report.flops_per_call,
                                "token/frame/block caches only: every step computed, the wrapped blocks on "
                                "their kept rows from the second call of each slot on")
